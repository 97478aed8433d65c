//! `cairn`: run, inspect, verify, resume and benchmark durable workflows on the embedded store.

mod audit;
mod bench;
mod bench_batch;
mod commands;
mod control;
mod fake_llm;
mod fork;
mod otel;
mod otel_bench;
mod otel_metrics;
mod run;
mod telemetry;
mod trace;
mod transfer;
mod workflows;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: the engine allocates many small short-lived buffers
/// (events, replies, futures) on one thread and frees them on another, which glibc's arenas
/// handle poorly (see docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Cairn: a durable workflow engine for multi-agent LLM workflows.
#[derive(Parser, Debug)]
#[command(name = "cairn", version, about, long_about = None)]
pub struct Cli {
    /// The store file (created on first write).
    #[arg(long, global = true, env = "CAIRN_STORE", default_value = "cairn.redb")]
    store: PathBuf,
    /// A sleep longer than this many seconds, or a signal wait unanswered for this long, parks
    /// the run (status `waiting`) instead of holding it in memory; `cairn worker` wakes it.
    #[arg(long, global = true, default_value_t = 60.0)]
    park_after: f64,
    /// At most this many runs execute at once in this process; more wait durably as
    /// `pending` and start in the order they were created.
    #[arg(long, global = true)]
    max_running: Option<usize>,
    /// How the log on stderr is written: `human` or `json` (one JSON object per line). What
    /// is logged is set by `RUST_LOG` (default: warnings, without the per-attempt step
    /// failures the output already reports; `RUST_LOG=cairn=info` shows every run, step,
    /// model and tool call as its span closes).
    #[arg(long, global = true, value_enum, default_value_t = telemetry::LogFormat::Human)]
    log_format: telemetry::LogFormat,
    /// Append one JSON line per live model call (`agent_call`: agent, model, tokens, latency,
    /// tool calls, success, cost, run id, timestamp) to FILE; `-` writes them to stderr.
    #[arg(long, global = true, value_name = "FILE")]
    metrics_log: Option<PathBuf>,
    /// Send live spans and metrics to this OpenTelemetry collector (OTLP/HTTP protobuf, e.g.
    /// http://localhost:4318: spans to URL/v1/traces, metrics to URL/v1/metrics) while
    /// workflows run; also where `cairn trace` sends. Without it, the OTEL_EXPORTER_OTLP_*
    /// endpoint variables turn live export on; with neither, it is off. The spans of at most
    /// 100 runs per second are exported (OTEL_TRACES_SAMPLER chooses another sampler); the
    /// metrics count every run.
    #[arg(long, global = true, value_name = "URL")]
    otlp: Option<String>,
    /// Internal, for `cairn bench`: build the live telemetry pipeline but discard its output.
    #[arg(long, global = true, hide = true)]
    otel_discard: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the built-in demo batch analysis (offline, no API key): 300 support tickets, three
    /// durable steps each. Kill it at any time; `cairn recover` finishes it where it was.
    Demo {
        /// How many tickets.
        #[arg(long, default_value_t = 300)]
        items: u32,
        /// How long each step works, in milliseconds.
        #[arg(long, default_value_t = 5)]
        step_ms: u64,
    },
    /// Start a built-in workflow with a JSON input and run it to the end.
    Start {
        /// The workflow name (see `cairn workflows`).
        workflow: String,
        /// The input as JSON.
        #[arg(long, default_value = "null")]
        input: String,
        /// Fail the run if it has not finished this many seconds after it starts (recorded,
        /// so it holds across restarts).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// List the built-in workflows.
    Workflows,
    /// List runs, newest first.
    Runs {
        /// Only runs with this status (pending, running, waiting, completed, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a run's timeline.
    Show {
        /// The run id.
        run: String,
        /// Show one agent's conversation (the path of its `agent:` scope), or one model or
        /// tool call, in full.
        #[arg(long, value_name = "PATH")]
        step: Option<String>,
    },
    /// Print a run's events as JSON lines, one event per line.
    Events {
        /// The run id.
        run: String,
        /// Start at this sequence number.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Keep printing events as they are recorded (by this or another process) until the
        /// run finishes; Ctrl-C stops.
        #[arg(long)]
        follow: bool,
    },
    /// Rebuild a run's state from its events (the replayer) and print it as JSON.
    Replay {
        /// The run id.
        run: String,
        /// Instead of printing the state, run today's built-in workflow code against the history
        /// without executing or writing anything, and report the first divergence (exit 1).
        #[arg(long)]
        check: bool,
    },
    /// Recompute a run's hash chain and compare it with what is stored.
    Verify {
        /// The run id (or --all).
        run: Option<String>,
        /// Verify every run in the store.
        #[arg(long, conflicts_with = "run")]
        all: bool,
    },
    /// Resume an interrupted run from its log.
    Resume {
        /// The run id.
        run: String,
        /// For a run of a workflow file: write item results here instead of the file the run
        /// was started with.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// For a run of a workflow file that changed since the run started: run the new file
        /// (steps already recorded are still checked against it).
        #[arg(long)]
        allow_changed: bool,
    },
    /// Run a workflow file (TOML, see docs/WORKFLOW_FILES.md) over a file of items, durably:
    /// prints the run id, a progress line, and streams item results to --output.
    Run {
        /// The workflow file.
        file: std::path::PathBuf,
        /// The items: JSON lines (one item per line) or a .csv file with a header row.
        #[arg(long)]
        input: Option<std::path::PathBuf>,
        /// Write one JSON line per finished item here (each item exactly once, across resumes).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
        /// A parameter declared under [params], as NAME=VALUE (repeatable).
        #[arg(long)]
        param: Vec<String>,
        /// Change a setting of the file for this run, as KEY=VALUE, e.g.
        /// models.fast.provider=anthropic (repeatable; recorded with the run).
        #[arg(long)]
        set: Vec<String>,
        /// Validate the file, the items and the parameters; run nothing.
        #[arg(long)]
        check: bool,
    },
    /// Follow a run of a workflow file another process executes (a worker, say), read-only:
    /// its progress and its item results (to --output, or the file it was started with), until
    /// it stops; for a finished run, write the results still missing.
    Follow {
        /// The run id.
        run: String,
        /// Write the item results here instead of the file the run was started with.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Resume every run a stopped or crashed process left running.
    Recover,
    /// Audit a run's agents: model calls, tokens, cost, latency, tool calls, failures and
    /// retries per agent, handoffs, routes, budget stops and totals.
    Audit {
        /// The run id.
        run: String,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write a run (its metadata and every event with its chain hash) as JSON lines, for
    /// `cairn import` into another store.
    Export {
        /// The run id.
        run: String,
        /// The file to write (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Read a run written by `cairn export` into this store, after checking its hash chain.
    Import {
        /// The export file.
        file: PathBuf,
    },
    /// Deliver a signal (e.g. a human approval) to a run waiting for it, or to be kept until it
    /// waits. Works while another cairn process holds the store (through its control socket).
    Signal {
        /// The run id.
        run: String,
        /// The signal's name.
        name: String,
        /// The signal's data, as JSON.
        #[arg(long, default_value = "null")]
        data: String,
    },
    /// Resolve a step that needs review (an at-most-once step, e.g. a tool that sends email,
    /// interrupted while running): say it happened (--done, with its output) or run it again
    /// (--retry); the run then continues.
    Review {
        /// The run id.
        run: String,
        /// The step's position (shown by `cairn show RUN`).
        step: String,
        /// The step's effect happened; record --output as its result.
        #[arg(long, conflicts_with = "retry", required_unless_present = "retry")]
        done: bool,
        /// The step's output, as JSON (with --done).
        #[arg(long, default_value = "null", requires = "done")]
        output: String,
        /// The step's effect did not happen; run it again.
        #[arg(long)]
        retry: bool,
    },
    /// Serve the store: recover interrupted runs, wake parked runs when their timers fire, and
    /// take signals and cancels from other cairn processes, until Ctrl-C.
    Worker,
    /// Cancel a run that is not finished (with its children). Works while another cairn
    /// process holds the store (through its control socket).
    Cancel {
        /// The run id.
        run: String,
        /// Why (recorded).
        #[arg(long, default_value = "cancelled from the CLI")]
        reason: String,
    },
    /// Fork a run: a new run that reuses its history before step PATH and executes from there
    /// (optionally with another input), run to its end like `resume`.
    Fork(fork::ForkArgs),
    /// Send a recorded run to an OpenTelemetry backend as a trace (OTLP/HTTP), with its
    /// original timestamps: a span per step, GenAI attributes on model and tool calls.
    Trace(trace::TraceArgs),
    /// Measure the engine on this machine (see docs/BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    // Behave like other Unix tools when the reader of our output goes away (`cairn events | head`):
    // end quietly instead of failing on a closed pipe.
    // SAFETY: setting a signal disposition to its default at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line: clap's first line names the problem; the rest is usage we point to.
            let rendered = e.render().to_string();
            // The first line, plus the indented lines that complete it (e.g. the list of
            // missing arguments), on one line.
            let mut lines = rendered.lines();
            let mut msg = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_end()
                .to_string();
            for l in lines.take_while(|l| l.starts_with("  ")) {
                msg.push(' ');
                msg.push_str(l.trim());
            }
            eprintln!("{msg} (see `cairn --help`)");
            return ExitCode::from(2);
        }
    };
    // `cairn trace` sends its own spans to --otlp; every other command exports live ones.
    let live = if matches!(cli.command, Command::Trace(_)) {
        Ok(None)
    } else {
        otel::settings(cli.otlp.as_deref(), cli.otel_discard, &|k| {
            std::env::var(k).ok()
        })
    };
    let live = match live {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    let pipeline = match telemetry::init(cli.log_format, cli.metrics_log.as_deref(), live.as_ref())
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let code = run_command(cli);
    // Send what is still queued; say once what could not be delivered.
    if let Some(p) = pipeline {
        if let Some(warning) = p.shutdown() {
            eprintln!("warning: {warning}");
        }
        if let Some(note) = p.sampling_note() {
            eprintln!("note: {note}");
        }
    }
    code
}

/// Runs the command on a fresh async runtime.
fn run_command(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if e.downcast_ref::<commands::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}
