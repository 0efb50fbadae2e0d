//! The protocol never changes by accident (as `buf breaking` checks for
//! protobuf users): the compiled `coca.proto` is compared with the committed
//! `snapshot.txt`. Removing or renumbering a field, changing its type or
//! label, reusing a number or un-reserving one is breaking and needs a new
//! `PROTOCOL_VERSION`; adding passes. The job plan (`Assignment.plan`, JSON)
//! is covered too, by its field paths: a worker refuses a plan with a field
//! it does not know, so any change to them needs a new version. Refresh the
//! snapshot with
//! `COCA_PROTO_SNAPSHOT=refresh cargo test -p proto --test compatibility`,
//! which refuses to record a breaking change under the old version.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use contract::dataset::{ClassName, Container, DatasetIndex, DatasetKind, ShardEntry};
use contract::manifest::Manifest;
use contract::plan::JobPlan;
use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorSet};

const REFRESH: &str = "COCA_PROTO_SNAPSHOT=refresh cargo test -p proto --test compatibility";

#[derive(Debug, Clone, Default, PartialEq)]
struct Protocol {
    version: u32,
    messages: BTreeMap<String, Fields>,
    enums: BTreeMap<String, Fields>,
    /// "Service.Method" -> "Request -> Reply".
    methods: BTreeMap<String, String>,
    /// The job plan's JSON: field path -> JSON type.
    plan: BTreeMap<String, String>,
}

/// A message's fields or an enum's values by number, and its reserved numbers.
#[derive(Debug, Clone, Default, PartialEq)]
struct Fields {
    /// number -> (name, type with label; empty for enum values).
    by_number: BTreeMap<i64, (String, String)>,
    reserved: Vec<(i64, i64)>,
}

impl Fields {
    fn reserves(&self, number: i64) -> bool {
        self.reserved
            .iter()
            .any(|&(start, end)| (start..=end).contains(&number))
    }
}

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("snapshot.txt")
}

/// The protocol this build compiled.
fn compiled() -> Protocol {
    let set = FileDescriptorSet::decode(proto::DESCRIPTOR).expect("the build's descriptor set decodes");
    let mut protocol = Protocol {
        version: proto::PROTOCOL_VERSION,
        ..Protocol::default()
    };
    for file in &set.file {
        let package = file.package();
        for message in &file.message_type {
            add_message(&mut protocol, package, message);
        }
        for enumeration in &file.enum_type {
            add_enum(&mut protocol, package, enumeration);
        }
        for service in &file.service {
            for method in &service.method {
                protocol.methods.insert(
                    format!("{package}.{}.{}", service.name(), method.name()),
                    format!(
                        "{} -> {}",
                        type_name(method.input_type()),
                        type_name(method.output_type())
                    ),
                );
            }
        }
    }
    protocol.plan = plan_paths();
    protocol
}

/// The field paths of a job plan with every optional part set, and their
/// JSON types (`.sources[].index.shards[].rows number`).
fn plan_paths() -> BTreeMap<String, String> {
    // Its own manifest, so that editing the demo's does not move the snapshot.
    let manifest = r#"
        [job]
        name = "example"
        steps = 10
        [model]
        preset = "tiny"
        [data]
        tokenizer = "data/tokenizer.json"
        streams = 2
        cache_dir = "cache"
        s3_endpoint = "http://127.0.0.1:8333"
        s3_region = "eu"
        [[data.source]]
        url = "data/align/{0..3}.tar"
        kind = "align"
        weight = 0.5
        [[data.source]]
        url = "data/jft"
        kind = "jft"
        weight = 0.5
        templates = "clip80"
        [train]
        global_batch = 8
        [cluster]
        workers = 2
        [checkpoint]
        url = "checkpoints"
        every = 5
        [eval]
        every = 5
        zeroshot = "data/jft-heldout"
        retrieval = "data/align-heldout"
    "#;
    let manifest = Manifest::parse(manifest, "example.toml").expect("the example manifest reads");
    let index = |kind, classes| {
        let mut index = DatasetIndex::new(kind, classes, "example");
        index.shards = (0..4)
            .map(|i| ShardEntry {
                file: format!("shard-{i}.arrow"),
                rows: 100,
                bytes: 1000,
                sha256: "0".repeat(64),
            })
            .collect();
        index
    };
    let classes = vec![ClassName {
        name: "cat".into(),
        parent: Some("animal".into()),
    }];
    // The align source is WebDataset tars read in place.
    let mut tars = index(DatasetKind::Align, Vec::new());
    tars.container = Container::Tar;
    let indexes = vec![tars, index(DatasetKind::Jft, classes)];
    let (plan, _) = JobPlan::new(&manifest, indexes).expect("the example plan");
    let mut paths = BTreeMap::new();
    walk(
        &serde_json::to_value(&plan).expect("a plan serializes"),
        String::new(),
        &mut paths,
    );
    paths
}

fn walk(value: &serde_json::Value, path: String, paths: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    let ty = match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(items) => {
            for item in items {
                walk(item, format!("{path}[]"), paths);
            }
            "array"
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                walk(field, format!("{path}.{key}"), paths);
            }
            "object"
        }
    };
    if !path.is_empty() {
        paths.insert(path, ty.to_string());
    }
}

fn add_message(protocol: &mut Protocol, scope: &str, message: &DescriptorProto) {
    let name = format!("{scope}.{}", message.name());
    let mut fields = Fields::default();
    for field in &message.field {
        fields
            .by_number
            .insert(field.number().into(), (field.name().to_string(), field_type(field)));
    }
    // Descriptor ranges are half-open; the snapshot's are inclusive.
    fields.reserved = message
        .reserved_range
        .iter()
        .map(|range| (range.start().into(), i64::from(range.end()) - 1))
        .collect();
    for nested in &message.nested_type {
        add_message(protocol, &name, nested);
    }
    for enumeration in &message.enum_type {
        add_enum(protocol, &name, enumeration);
    }
    protocol.messages.insert(name, fields);
}

fn add_enum(protocol: &mut Protocol, scope: &str, enumeration: &EnumDescriptorProto) {
    let mut values = Fields::default();
    for value in &enumeration.value {
        values
            .by_number
            .insert(value.number().into(), (value.name().to_string(), String::new()));
    }
    values.reserved = enumeration
        .reserved_range
        .iter()
        .map(|range| (range.start().into(), range.end().into()))
        .collect();
    protocol.enums.insert(format!("{scope}.{}", enumeration.name()), values);
}

fn type_name(name: &str) -> String {
    name.trim_start_matches('.').to_string()
}

/// e.g. `repeated coca.v1.StepMetrics`, `optional uint32`, `string`.
fn field_type(field: &FieldDescriptorProto) -> String {
    let ty = match field.r#type() {
        Type::Message | Type::Enum | Type::Group => type_name(field.type_name()),
        scalar => scalar.as_str_name().trim_start_matches("TYPE_").to_lowercase(),
    };
    match field.label() {
        Label::Repeated => format!("repeated {ty}"),
        _ if field.proto3_optional() => format!("optional {ty}"),
        _ => ty,
    }
}

fn render(protocol: &Protocol) -> String {
    let mut text = format!(
        "# coca.proto as the compatibility test reads it (proto/tests/compatibility.rs).\n\
         # Written by: {REFRESH}\n\
         protocol_version {}\n",
        protocol.version
    );
    let mut block = |kind: &str, name: &str, fields: &Fields| {
        writeln!(text, "{kind} {name}").unwrap();
        for (number, (name, ty)) in &fields.by_number {
            writeln!(text, "  {number} {name}{}{ty}", if ty.is_empty() { "" } else { " " }).unwrap();
        }
        if !fields.reserved.is_empty() {
            let ranges: Vec<String> = fields
                .reserved
                .iter()
                .map(|&(start, end)| {
                    if start == end {
                        start.to_string()
                    } else {
                        format!("{start}-{end}")
                    }
                })
                .collect();
            writeln!(text, "  reserved {}", ranges.join(" ")).unwrap();
        }
    };
    for (name, fields) in &protocol.messages {
        block("message", name, fields);
    }
    for (name, values) in &protocol.enums {
        block("enum", name, values);
    }
    for (method, signature) in &protocol.methods {
        writeln!(text, "rpc {method} {signature}").unwrap();
    }
    for (path, ty) in &protocol.plan {
        writeln!(text, "plan {path} {ty}").unwrap();
    }
    text
}

fn parse(text: &str) -> Protocol {
    let mut protocol = Protocol::default();
    let mut current: Option<&mut Fields> = None;
    for (line_number, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(entry) = line.strip_prefix("  ") {
            let fields = current.as_deref_mut().unwrap_or_else(|| unreadable(line_number, line));
            if let Some(ranges) = entry.strip_prefix("reserved ") {
                for range in ranges.split(' ') {
                    let (start, end) = range.split_once('-').unwrap_or((range, range));
                    fields.reserved.push((
                        start.parse().unwrap_or_else(|_| unreadable(line_number, line)),
                        end.parse().unwrap_or_else(|_| unreadable(line_number, line)),
                    ));
                }
                continue;
            }
            let mut parts = entry.splitn(3, ' ');
            let (Some(number), Some(name)) = (parts.next(), parts.next()) else {
                unreadable(line_number, line)
            };
            let ty = parts.next().unwrap_or("").to_string();
            fields.by_number.insert(
                number.parse().unwrap_or_else(|_| unreadable(line_number, line)),
                (name.to_string(), ty),
            );
            continue;
        }
        let (kind, rest) = line.split_once(' ').unwrap_or_else(|| unreadable(line_number, line));
        current = match kind {
            "protocol_version" => {
                protocol.version = rest.parse().unwrap_or_else(|_| unreadable(line_number, line));
                None
            }
            "message" => Some(protocol.messages.entry(rest.to_string()).or_default()),
            "enum" => Some(protocol.enums.entry(rest.to_string()).or_default()),
            "rpc" => {
                let (method, signature) = rest.split_once(' ').unwrap_or_else(|| unreadable(line_number, line));
                protocol.methods.insert(method.to_string(), signature.to_string());
                None
            }
            "plan" => {
                let (path, ty) = rest.split_once(' ').unwrap_or_else(|| unreadable(line_number, line));
                protocol.plan.insert(path.to_string(), ty.to_string());
                None
            }
            _ => unreadable(line_number, line),
        };
    }
    protocol
}

fn unreadable(line_number: usize, line: &str) -> ! {
    panic!("snapshot.txt line {}: cannot read `{line}`", line_number + 1)
}

/// What changed from `old` to `new`: (breaking changes, additions).
fn compare(old: &Protocol, new: &Protocol) -> (Vec<String>, Vec<String>) {
    let mut breaking = Vec::new();
    let mut added = Vec::new();
    for (kind, olds, news) in [
        ("message", &old.messages, &new.messages),
        ("enum", &old.enums, &new.enums),
    ] {
        let what = if kind == "message" { "field" } else { "value" };
        for (name, was) in olds {
            let Some(is) = news.get(name) else {
                breaking.push(format!("{kind} {name} was removed"));
                continue;
            };
            for (number, (field, ty)) in &was.by_number {
                match is.by_number.get(number) {
                    None if is.reserves(*number) => {}
                    None => breaking.push(format!(
                        "{name}.{field} ({what} {number}) was removed without reserving its number \
                         (add `reserved {number};` to {kind} {name})"
                    )),
                    Some((now, _)) if now != field => breaking.push(format!(
                        "{name}: {what} {number} was `{field}` and is now `{now}`: a number keeps its {what} \
                         for good (give `{now}` a new number)"
                    )),
                    Some((_, now)) if now != ty => breaking.push(format!(
                        "{name}.{field} ({what} {number}) changed type: `{ty}` -> `{now}`"
                    )),
                    Some(_) => {}
                }
            }
            for &(start, end) in &was.reserved {
                for number in start..=end.min(start + 1000) {
                    if !is.reserves(number) {
                        breaking.push(format!("{name}: number {number} was reserved and no longer is"));
                    }
                }
            }
            for (number, (field, ty)) in &is.by_number {
                if !was.by_number.contains_key(number) {
                    added.push(format!("{name}.{field} ({what} {number}, {ty})"));
                }
            }
        }
        for name in news.keys().filter(|name| !olds.contains_key(*name)) {
            added.push(format!("{kind} {name}"));
        }
    }
    for (method, was) in &old.methods {
        match new.methods.get(method) {
            None => breaking.push(format!("rpc {method} was removed")),
            Some(is) if is != was => breaking.push(format!("rpc {method} changed: `{was}` -> `{is}`")),
            Some(_) => {}
        }
    }
    for method in new.methods.keys().filter(|method| !old.methods.contains_key(*method)) {
        added.push(format!("rpc {method}"));
    }
    for (path, was) in &old.plan {
        match new.plan.get(path) {
            None => breaking.push(format!("job plan: `{path}` was removed")),
            Some(is) if is != was => breaking.push(format!("job plan: `{path}` changed type: {was} -> {is}")),
            Some(_) => {}
        }
    }
    for path in new.plan.keys().filter(|path| !old.plan.contains_key(*path)) {
        breaking.push(format!(
            "job plan: `{path}` was added (a worker refuses a plan with a field it does not know)"
        ));
    }
    (breaking, added)
}

#[test]
fn the_protocol_changes_only_compatibly_or_with_a_new_version() {
    let path = snapshot_path();
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let snapshot = parse(&text);
    let now = compiled();
    let (breaking, added) = compare(&snapshot, &now);
    let version = proto::PROTOCOL_VERSION;
    let listed = |changes: &[String]| changes.iter().map(|c| format!("\n  - {c}")).collect::<String>();
    if std::env::var("COCA_PROTO_SNAPSHOT").as_deref() == Ok("refresh") {
        assert!(
            breaking.is_empty() || version > snapshot.version,
            "not refreshed: breaking changes under protocol version {version}, which the snapshot already \
             records; raise PROTOCOL_VERSION in proto/src/lib.rs first:{}",
            listed(&breaking)
        );
        std::fs::write(&path, render(&now)).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    assert!(
        version >= snapshot.version,
        "PROTOCOL_VERSION went down: {version}, the snapshot records {}",
        snapshot.version
    );
    assert!(
        breaking.is_empty() || version > snapshot.version,
        "coca.proto changed incompatibly under protocol version {version}:{}\n\
         Undo these, or raise PROTOCOL_VERSION in proto/src/lib.rs and refresh the snapshot: {REFRESH}",
        listed(&breaking)
    );
    assert_eq!(
        version,
        snapshot.version,
        "PROTOCOL_VERSION is {version}, the snapshot records {}: refresh it ({REFRESH}){}",
        snapshot.version,
        listed(&breaking)
    );
    if !added.is_empty() {
        eprintln!(
            "coca.proto gained (compatible):{}\nrecord them in the snapshot: {REFRESH}",
            listed(&added)
        );
    }
}

#[test]
fn the_snapshot_reads_back_as_written() {
    let now = compiled();
    assert_eq!(parse(&render(&now)), now);
    assert!(
        now.messages.contains_key("coca.v1.Assignment"),
        "{:?}",
        now.messages.keys()
    );
    assert_eq!(
        now.methods["coca.v1.Coordinator.Rendezvous"],
        "coca.v1.RendezvousRequest -> coca.v1.Assignment"
    );
}

/// The compiled protocol with `edit` applied to one message's fields.
fn edited(message: &str, edit: impl FnOnce(&mut Fields)) -> Protocol {
    let mut protocol = compiled();
    edit(protocol.messages.get_mut(message).expect("the message exists"));
    protocol
}

fn breaking(new: &Protocol) -> Vec<String> {
    compare(&compiled(), new).0
}

#[test]
fn removed_renumbered_retyped_and_reused_fields_are_named() {
    let message = "coca.v1.HeartbeatRequest";
    let removed = edited(message, |fields| {
        fields.by_number.remove(&2);
    });
    assert_eq!(
        breaking(&removed),
        [
            "coca.v1.HeartbeatRequest.step (field 2) was removed without reserving its number \
          (add `reserved 2;` to message coca.v1.HeartbeatRequest)"
        ]
    );
    // Reserved, the removal is compatible.
    let reserved = edited(message, |fields| {
        fields.by_number.remove(&2);
        fields.reserved.push((2, 2));
    });
    assert_eq!(breaking(&reserved), Vec::<String>::new());

    let renumbered = edited(message, |fields| {
        let step = fields.by_number.remove(&2).unwrap();
        fields.by_number.insert(20, step);
    });
    let changes = breaking(&renumbered);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].contains("step (field 2) was removed"), "{changes:?}");

    let retyped = edited(message, |fields| {
        fields.by_number.get_mut(&2).unwrap().1 = "int32".into()
    });
    assert_eq!(
        breaking(&retyped),
        ["coca.v1.HeartbeatRequest.step (field 2) changed type: `uint64` -> `int32`"]
    );
    let relabelled = edited(message, |fields| {
        fields.by_number.get_mut(&2).unwrap().1 = "repeated uint64".into()
    });
    assert_eq!(
        breaking(&relabelled),
        ["coca.v1.HeartbeatRequest.step (field 2) changed type: `uint64` -> `repeated uint64`"]
    );
    let reused = edited(message, |fields| {
        fields.by_number.insert(2, ("steps_done".into(), "uint64".into()));
    });
    assert_eq!(
        breaking(&reused),
        [
            "coca.v1.HeartbeatRequest: field 2 was `step` and is now `steps_done`: a number keeps its field for good \
          (give `steps_done` a new number)"
        ]
    );
}

#[test]
fn any_change_to_the_job_plans_fields_needs_a_new_version() {
    let now = compiled();
    assert_eq!(now.plan[".train.learning_rate"], "number");
    assert_eq!(now.plan[".sources[].index.shards[].rows"], "number");
    assert_eq!(now.plan[".eval.retrieval"], "string");
    let mut changed = now.clone();
    changed.plan.remove(".train.learning_rate");
    changed.plan.insert(".train.nesterov".into(), "number".into());
    changed.plan.insert(".seed".into(), "string".into());
    assert_eq!(
        compare(&now, &changed).0,
        [
            "job plan: `.seed` changed type: number -> string",
            "job plan: `.train.learning_rate` was removed",
            "job plan: `.train.nesterov` was added (a worker refuses a plan with a field it does not know)",
        ]
    );
}

#[test]
fn additions_pass_and_removed_messages_enum_values_and_methods_do_not() {
    let mut grown = edited("coca.v1.HeartbeatRequest", |fields| {
        fields.by_number.insert(99, ("temperature".into(), "double".into()));
    });
    grown.messages.insert("coca.v1.Extra".into(), Fields::default());
    grown.methods.insert(
        "coca.v1.Coordinator.Ping".into(),
        "coca.v1.Extra -> coca.v1.Extra".into(),
    );
    let (breaking_changes, added) = compare(&compiled(), &grown);
    assert_eq!(breaking_changes, Vec::<String>::new());
    assert_eq!(
        added,
        [
            "coca.v1.HeartbeatRequest.temperature (field 99, double)",
            "message coca.v1.Extra",
            "rpc coca.v1.Coordinator.Ping"
        ]
    );

    let mut shrunk = compiled();
    shrunk.messages.remove("coca.v1.FinishReply");
    shrunk.enums.get_mut("coca.v1.Command").unwrap().by_number.remove(&2);
    shrunk.methods.remove("coca.v1.Coordinator.Finish");
    assert_eq!(
        breaking(&shrunk),
        [
            "message coca.v1.FinishReply was removed",
            "coca.v1.Command.REGROUP (value 2) was removed without reserving its number \
             (add `reserved 2;` to enum coca.v1.Command)",
            "rpc coca.v1.Coordinator.Finish was removed",
        ]
    );

    // A number once reserved stays reserved.
    let reserved = edited("coca.v1.HeartbeatReply", |fields| fields.reserved.push((5, 5)));
    let unreserved = compiled();
    assert_eq!(
        compare(&reserved, &unreserved).0,
        ["coca.v1.HeartbeatReply: number 5 was reserved and no longer is"]
    );
}
