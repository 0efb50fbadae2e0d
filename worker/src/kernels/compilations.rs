//! Counting the kernels cubecl compiles, from the `log` records its
//! compilation logger writes (`config::runtime_config` turns them on).

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::KernelError;

/// Where cubecl's logger sinks write `log` records from.
const CUBECL_LOG_TARGET: &str = "cubecl_common::config::logger";

/// Kernels compiled so far in this process.
#[derive(Debug, Default)]
pub struct Compilations {
    count: AtomicU64,
}

/// `log` takes one `&'static` logger per process, hence a static.
static COMPILATIONS: Compilations = Compilations {
    count: AtomicU64::new(0),
};

impl Compilations {
    /// Installs the process's counter as the `log` logger.
    pub fn install() -> Result<&'static Compilations, KernelError> {
        log::set_logger(&COMPILATIONS).map_err(|_| KernelError::LoggerTaken)?;
        log::set_max_level(log::LevelFilter::Info);
        Ok(&COMPILATIONS)
    }

    pub fn total(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl log::Log for Compilations {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.target() == CUBECL_LOG_TARGET || metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if record.target() == CUBECL_LOG_TARGET {
            self.count.fetch_add(1, Ordering::Relaxed);
        } else if record.level() <= log::Level::Warn {
            // cubecl's own warnings (a damaged cache file, say) stay visible.
            match record.level() {
                log::Level::Error => tracing::error!("{}: {}", record.target(), record.args()),
                _ => tracing::warn!("{}: {}", record.target(), record.args()),
            }
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use log::Log;

    use super::*;

    fn record(target: &str, level: log::Level, log: impl FnOnce(&log::Record)) {
        log(&log::Record::builder()
            .target(target)
            .level(level)
            .args(format_args!("extern \"C\" __global__ void kernel() {{}}"))
            .build());
    }

    #[test]
    fn counts_cubecl_compilation_records_and_nothing_else() {
        let counter = Compilations::default();
        record(CUBECL_LOG_TARGET, log::Level::Info, |r| counter.log(r));
        record(CUBECL_LOG_TARGET, log::Level::Info, |r| counter.log(r));
        record("cubecl_runtime::tune::tune_cache", log::Level::Info, |r| counter.log(r));
        record("cubecl_common::cache", log::Level::Warn, |r| counter.log(r));
        assert_eq!(counter.total(), 2);
        let info = log::Metadata::builder()
            .target("cubecl_runtime::tune")
            .level(log::Level::Info)
            .build();
        assert!(!counter.enabled(&info), "other crates' chatter is not asked for");
    }
}
