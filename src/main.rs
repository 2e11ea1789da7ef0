//! The `linkup-gateway` binary: a thin clap front over the library.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use linkup_gateway::{config, demo, emulator, keygen, server};

#[derive(Parser)]
#[command(
    name = "linkup-gateway",
    version,
    about = "A gateway in front of LinkupAPI v2: virtual keys, per-account rate limits, checkpoint coalescing, credit accounting"
)]
struct Cli {
    /// Log format: `text` (default on a terminal) or `json` (default otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `linkup_gateway=debug` (default: $RUST_LOG, else `info`).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum UsageFormat {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Parse and validate a config file; print each problem with its key path.
    CheckConfig {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Print a fresh virtual key (once) and the [[clients]] block that holds only its SHA-256;
    /// with --rotate, a new key for an existing client and the line that adds it.
    Keygen {
        /// The client's name, as it will appear in metrics, logs and usage reports.
        #[arg(long, required_unless_present = "rotate", conflicts_with = "rotate")]
        name: Option<String>,
        /// An existing client: print a second key for it (both work until the old one's not_after).
        #[arg(long, value_name = "NAME")]
        rotate: Option<String>,
    },
    /// Credit usage from the ledger: grouped, over a range of UTC days (default: today).
    Usage {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
        /// First day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        from: Option<String>,
        /// Last day, inclusive (default: today).
        #[arg(long)]
        to: Option<String>,
        /// Grouping keys: any of client,account,action,day,outcome (default: client, or the
        /// cursor's).
        #[arg(long)]
        by: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: UsageFormat,
        /// Print one page of at most this many rows (1 to 10000) and, on stderr, the cursor of
        /// the next one. Without it every row is printed, read from the ledger page by page.
        #[arg(long, value_parser = linkup_gateway::usage::parse_limit)]
        limit: Option<usize>,
        /// Start after the row this cursor (printed by an earlier `--limit` run, or a /usage
        /// `next_cursor`) names; --from, --to and --by default to the cursor's.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Run a local LinkupAPI v2 emulator (costs nothing; for development, demos and tests).
    Emulator {
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        /// The upstream key the emulator accepts.
        #[arg(
            long,
            env = "LINKUP_EMULATOR_KEY",
            default_value = "emulator-key",
            hide_env_values = true
        )]
        api_key: String,
        /// Starting credit balance.
        #[arg(long, default_value_t = 10_000)]
        credits: i64,
    },
    /// Run the emulator and the gateway together (config/demo.toml) and print a curl walk-through.
    Demo {
        #[arg(long, default_value = "config/demo.toml")]
        config: PathBuf,
    },
}

/// Logs go through a writer thread, so a request never waits on a `write(2)` to stdout; it is
/// not lossy (a full buffer slows logging down rather than dropping lines). Keep the guard
/// alive until exit: dropping it flushes what is buffered.
fn init_logging(format: Option<LogFormat>, level: Option<&str>) -> LogGuards {
    let filter = match level {
        Some(l) => tracing_subscriber::EnvFilter::new(l),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let json = match format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stdout().is_terminal(),
    };
    // 8,192 lines of operational log buffered (tracing-appender's default, 128,000, is a
    // channel of that many slots allocated up front: 6 MB of every process's RSS, heaptrack).
    // The access log has a writer of its own (`access_log`).
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8_192)
        .lossy(false)
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(writer)
        .with_ansi(!json && std::io::stdout().is_terminal());
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
    // The one line per request has a writer of its own, in the same format and behind the
    // same filter.
    let format = if json {
        linkup_gateway::access_log::Format::Json
    } else {
        linkup_gateway::access_log::Format::Text
    };
    let access = linkup_gateway::access_log::install(format, std::io::stdout());
    LogGuards {
        _operational: guard,
        _access: access,
    }
}

/// Dropping these flushes both log writers.
struct LogGuards {
    _operational: tracing_appender::non_blocking::WorkerGuard,
    _access: linkup_gateway::access_log::Guard,
}

fn load_or_report(path: &Path) -> Option<config::Settings> {
    match config::load(path) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("{}: invalid configuration:", path.display());
            for p in e.problems() {
                eprintln!("  {p}");
            }
            None
        }
    }
}

/// Why `usage` stopped.
enum ReportError {
    Ledger(linkup_gateway::ledger::LedgerError),
    Output(std::io::Error),
}

impl From<std::io::Error> for ReportError {
    fn from(e: std::io::Error) -> ReportError {
        ReportError::Output(e)
    }
}

impl From<linkup_gateway::ledger::LedgerError> for ReportError {
    fn from(e: linkup_gateway::ledger::LedgerError) -> ReportError {
        ReportError::Ledger(e)
    }
}

/// Write a report page by page (one page in memory at a time): with `limit`, the one page and
/// the cursor of the next (returned); otherwise every row.
fn write_report(
    ledger: &dyn linkup_gateway::ledger::Ledger,
    paged: linkup_gateway::usage::PagedQuery,
    format: UsageFormat,
    limit: Option<usize>,
    out: &mut impl std::io::Write,
) -> Result<Option<String>, ReportError> {
    use linkup_gateway::usage;
    let q = paged.query;
    let mut after = paged.after;
    let by = q.by.clone();
    let size = limit.unwrap_or(linkup_gateway::ledger::USAGE_READ_PAGE);
    let mut table = usage::TableWriter::new(&by);
    let mut first_row = true;
    match format {
        UsageFormat::Csv => out.write_all(&usage::csv_header(&by))?,
        UsageFormat::Json => out.write_all(b"{\"rows\":[")?,
        UsageFormat::Table => {}
    }
    loop {
        let page = ledger.usage_page(&q, after.as_deref(), size)?;
        match format {
            UsageFormat::Table => out.write_all(table.page(&page.rows).as_bytes())?,
            UsageFormat::Csv => out.write_all(&usage::csv_rows(&page.rows, &by))?,
            UsageFormat::Json => {
                for row in &page.rows {
                    out.write_all(if first_row { b"\n" } else { b",\n" })?;
                    serde_json::to_writer(&mut *out, row).map_err(std::io::Error::from)?;
                    first_row = false;
                }
            }
        }
        after = page.next;
        if limit.is_some() || after.is_none() {
            break;
        }
    }
    let next = after.map(|keys| usage::encode_cursor(&q, &keys));
    match format {
        UsageFormat::Table => {
            let label = if next.is_some() {
                "PAGE TOTAL"
            } else {
                "TOTAL"
            };
            out.write_all(table.finish(label).as_bytes())?;
        }
        UsageFormat::Csv => {}
        UsageFormat::Json => {
            let cursor = serde_json::to_string(&next).map_err(std::io::Error::from)?;
            let gap = if first_row { "" } else { "\n" };
            out.write_all(format!("{gap}],\"next_cursor\":{cursor}}}\n").as_bytes())?;
        }
    }
    out.flush()?;
    Ok(next)
}

fn usage(
    config: &Path,
    paged: Result<linkup_gateway::usage::PagedQuery, String>,
    format: UsageFormat,
    limit: Option<usize>,
) -> ExitCode {
    let paged = match paged {
        Ok(p) => p,
        Err(e) => {
            eprintln!("usage: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match config::load_ledger(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: invalid configuration:", config.display());
            for p in e.problems() {
                eprintln!("  {p}");
            }
            return ExitCode::from(1);
        }
    };
    if settings.postgres_url.is_none() && !settings.path.exists() {
        eprintln!(
            "usage: no ledger at {} (ledger.path): nothing recorded yet",
            settings.path.display()
        );
        return ExitCode::from(1);
    }
    // The fleet's ledger when `ledger.postgres_url` is set: every replica's rows.
    let ledger = match linkup_gateway::ledger::open_for_report(&settings) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("usage: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match write_report(ledger.as_ref(), paged, format, limit, &mut out) {
        Ok(next) => {
            if let Some(next) = next {
                eprintln!("usage: more rows follow; the next page: --cursor {next}");
            }
            ExitCode::SUCCESS
        }
        // `usage | head`: the reader has what it wanted.
        Err(ReportError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(ReportError::Output(e)) => {
            eprintln!("usage: writing the report failed: {e}");
            ExitCode::from(1)
        }
        Err(ReportError::Ledger(e)) => {
            eprintln!("usage: {e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { name, rotate } => {
            let out = match (name, rotate) {
                (_, Some(rotate)) => keygen::render_rotation(&rotate),
                (Some(name), None) => keygen::render(&name),
                (None, None) => Err("give --name NAME or --rotate NAME".into()),
            };
            match out {
                Ok(g) => {
                    // The key to the terminal (stderr), the TOML to stdout: `>> gateway.toml`
                    // appends only the hash.
                    eprint!("{}", g.notice);
                    print!("{}", g.toml);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keygen: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::CheckConfig { config } => match load_or_report(&config) {
            Some(s) => {
                println!(
                    "{}: ok ({} client(s), upstream {}, key from {})",
                    config.display(),
                    s.clients.len(),
                    s.upstream.url,
                    s.upstream.api_key_source
                );
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Usage {
            config,
            from,
            to,
            by,
            format,
            limit,
            cursor,
        } => usage(
            &config,
            linkup_gateway::usage::paged_query(
                from.as_deref(),
                to.as_deref(),
                by.as_deref(),
                cursor.as_deref(),
            ),
            format,
            limit,
        ),
        Command::Serve { config } => {
            let _logs = init_logging(cli.log_format, cli.log_level.as_deref());
            let Some(settings) = load_or_report(&config) else {
                return ExitCode::from(1);
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(server::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "linkup-gateway failed");
                    eprintln!("linkup-gateway: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Emulator {
            listen,
            api_key,
            credits,
        } => {
            let _logs = init_logging(cli.log_format, cli.log_level.as_deref());
            let cfg = emulator::EmulatorConfig {
                api_key,
                initial_credits: credits,
                ..Default::default()
            };
            let result = runtime().and_then(|rt| rt.block_on(emulator::run(listen, cfg)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("emulator: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { config } => {
            let _logs = init_logging(
                Some(cli.log_format.unwrap_or(LogFormat::Text)),
                Some(cli.log_level.as_deref().unwrap_or("warn")),
            );
            let result = runtime()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(demo::run(&config)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
