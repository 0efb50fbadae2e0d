#!/usr/bin/env python3
"""Pairs of source files that import each other (crate::, super::, self::
paths, within each crate of the workspace); prints them and their count.

    python3 scripts/mutual-imports.py [ROOT]
"""
import os, re, sys, glob
root = sys.argv[1] if len(sys.argv) > 1 else '.'

crates = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, 'Cargo.toml')) and os.path.isdir(os.path.join(root, d, 'src'))] + ['.']
found = []
for crate in crates:
    src = os.path.normpath(os.path.join(root, crate, 'src'))
    files = {}
    for path in glob.glob(src + '/**/*.rs', recursive=True):
        rel = os.path.relpath(path, src)[:-3].split(os.sep)
        if rel[-1] in ('mod', 'lib', 'main'):
            rel = rel[:-1]
        files[tuple(rel)] = path
    def resolve(parts):
        # The longest prefix of the path that is a file's module.
        for n in range(len(parts), 0, -1):
            if tuple(parts[:n]) in files:
                return tuple(parts[:n])
        return None
    edges = set()
    for mod, path in files.items():
        text = open(path).read()
        text = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', text, flags=re.S)
        for m in re.finditer(r'\b(crate|super|self)((?:::\w+)+)', text):
            head, rest = m.group(1), m.group(2).split('::')[1:]
            if head == 'crate':
                base = []
            elif head == 'super':
                base = list(mod[:-1])
                while rest and rest[0] == 'super':
                    base = base[:-1]; rest = rest[1:]
            else:
                base = list(mod)
            target = resolve(base + rest)
            if target is not None and target != mod:
                edges.add((mod, target))
    for a, b in edges:
        if (b, a) in edges and a < b:
            found.append((crate, files[a], files[b]))
for crate, a, b in found:
    print(os.path.relpath(a, root), '<->', os.path.relpath(b, root))
print(len(found), 'pairs')
