//! `cairn bench`: workloads that measure this machine's limits and the engine against them.
//!
//! Nine workloads, each on a fresh store in a directory created under `--dir` and removed at
//! the end: `fsync` (the disk's commit limit: 4 KiB write + fdatasync), `seq` (one workflow of
//! sequential durable steps), `many` (many workflows at once, sharing group commits), `replay`
//! (folding a recorded history of 100,000 events), `recovery` (a child process SIGKILLed
//! mid-run, then resumed here), `fanout` (one workflow fanning out to thousands of one-step
//! branches), `fanout-large` (100,000 branches in a child process, for its peak RSS and the
//! load time of the finished run) and `fanout-resume` (a 100,000-branch fan-out SIGKILLed at
//! ~50% and resumed here) and `agents` (1,000 three-turn tool-using agent runs against an
//! in-process zero-latency fake Anthropic server over loopback HTTP, timed against the same
//! agent loop without the engine). The targets are judged on ratios measured in the same run, so they
//! say how close the engine gets to this disk rather than quoting absolute numbers.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use cairn_engine::{Engine, Event, Payload, Registry, RunOutcome, StartOptions, StepPath, fold};
use cairn_storage::{
    Durability, EventStore, NewEvent, NewRun, RedbStore, RunId, RunStatus, Seq, StoreOptions,
    StoredEvent,
};
use clap::ValueEnum;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{fake_llm, workflows};

/// Arguments of `cairn bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Workloads to run (default: all, in the order fsync, seq, many, replay, recovery, fanout,
    /// fanout-large, fanout-resume, agents, telemetry, batch).
    #[arg(value_enum)]
    pub workloads: Vec<Workload>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where the stores go: a fresh directory is created inside it and removed at the end
    /// (default: the system temp directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Steps of the `seq` workflow.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: u32,
    /// Workflows started at once by `many`.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub workflows: u32,
    /// Steps of each `many` workflow.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub steps_per_workflow: u32,
    /// Events in the history `replay` folds.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(2..))]
    pub events: u32,
    /// Steps of the workflow `recovery` kills and resumes.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(10..))]
    pub recovery_steps: u32,
    /// Branches of the `fanout` workflow.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub branches: u32,
    /// Branches `fanout` runs at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
    /// Branches of the `fanout-large` workflow.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub large_branches: u32,
    /// Branches of the fan-out `fanout-resume` kills and resumes.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(10..))]
    pub resume_branches: u32,
    /// Branches `fanout-large` and `fanout-resume` run at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub large_concurrency: u32,
    /// Agent runs of the `agents` workload (3 model calls and 2 tool calls each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_runs: u32,
    /// Agent runs `agents` runs at once (with and without the engine).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_concurrency: u32,
    /// Rounds of the short core workloads (`fsync`, `seq`, `many`, `fanout`): they run in turn,
    /// round after round, each on a fresh store, and each reports its median round (9: the
    /// median of 5 rounds of 10–30 ms swung across the targets on a noisy 2-core VM).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Unrecorded rounds of `seq`, `many` and `fanout` before the `--rounds`: the first runs
    /// in a process pay for faulting in the allocator's memory and starting threads.
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// Rounds of `telemetry` (each runs `seq`, `many` and `agents` with telemetry off twice,
    /// to a discarding pipeline and to a loopback OTLP receiver).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub telemetry_rounds: u32,
    /// Items of the `batch` workload (a workflow file: router + one agent per item).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_items: u32,
    /// Items `batch` runs at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch_concurrency: u32,
    /// Internal, for `fanout-large`: instead of benchmarking, run `cairn CHILD_ARGS…` as a child
    /// process, reap it with `wait4` and write its exit status, wall time, peak RSS and CPU
    /// time to this file as JSON.
    #[arg(long, hide = true, value_name = "FILE", requires = "child_args")]
    pub rusage_report: Option<PathBuf>,
    /// The arguments of the child `--rusage-report` runs, after `--`.
    #[arg(last = true, hide = true, value_name = "CHILD_ARGS")]
    pub child_args: Vec<OsString>,
}

/// One benchmark workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// The disk's limit: 4 KiB write + fdatasync, repeated.
    Fsync,
    /// One workflow of N sequential durable steps.
    Seq,
    /// W workflows of S steps each, started at once.
    Many,
    /// Folding a recorded history of E events.
    Replay,
    /// A run SIGKILLed at about 40% and resumed.
    Recovery,
    /// One workflow fanning out to B one-step branches, C at a time.
    Fanout,
    /// A 100,000-branch fan-out in a child process: its peak RSS, then loading the finished run.
    FanoutLarge,
    /// A 100,000-branch fan-out SIGKILLed at about 50% of its branches and resumed.
    FanoutResume,
    /// 1,000 agent runs (3 model calls, 2 tool calls each) against an in-process fake
    /// Anthropic server, with and without the engine.
    Agents,
    /// `seq`, `many` and `agents` in child processes with live telemetry off, to a
    /// discarding pipeline and to a loopback OTLP receiver (see `--telemetry-rounds`).
    Telemetry,
    /// A workflow file over 10,000 items (a router's classifier and one agent per item)
    /// against the fake Anthropic server, with and without the engine.
    Batch,
}

/// Size of one write of the `fsync` workload.
const FSYNC_BLOCK: usize = 4096;
/// Size of the preallocated file the `fsync` workload overwrites, in blocks (4 MiB).
const FSYNC_FILE_BLOCKS: u64 = 1024;
/// The most writes the `fsync` workload makes.
const FSYNC_MAX_WRITES: usize = 1000;
/// The fewest writes the `fsync` workload makes, however slow the disk.
const FSYNC_MIN_WRITES: usize = 50;
/// How long the `fsync` workload runs at most (once it has its minimum writes).
const FSYNC_MAX_TIME: Duration = Duration::from_secs(2);
/// Approximate size of each step's JSON output, as the `steps` workflow makes it.
const PAYLOAD_BYTES: usize = 100;
/// Events per append while `replay` builds its history.
const REPLAY_BATCH: u32 = 1000;
/// Events per read while `replay` reads the history into memory.
const REPLAY_PAGE: usize = 8192;
/// Repetitions of each `replay` measurement (the median is reported).
const REPLAY_REPS: usize = 5;
/// How long `recovery` waits for the child to reach the kill point.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// The `replay` target: events folded per second.
const REPLAY_TARGET_EPS: f64 = 1_000_000.0;
/// The `seq` target: fraction of the `fsync` rate.
const SEQ_TARGET_RATIO: f64 = 0.70;
/// The `many` target: multiple of the `seq` steps/s.
const MANY_TARGET_RATIO: f64 = 20.0;
/// The `recovery` target: steps executed more than once.
const RECOVERY_TARGET_REEXECUTED: u64 = 1;
/// The `fanout` target: multiple of the `fsync` commits/s, in branches/s.
const FANOUT_TARGET_RATIO: f64 = 10.0;
/// The `fanout-large` target: peak RSS of the process running the fan-out, in MiB.
const FANOUT_LARGE_TARGET_RSS_MIB: f64 = 300.0;
/// How long a `fanout-large` or `fanout-resume` child may run before the bench gives up.
const FANOUT_CHILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How often `fanout-resume` looks for new side-effect lines while the child runs.
const FANOUT_POLL: Duration = Duration::from_millis(1);
/// The `agents` target: engine overhead per recorded model call, in milliseconds.
const AGENTS_TARGET_OVERHEAD_MS: f64 = 1.0;
/// Model calls of one `agents` run.
const AGENTS_MODEL_CALLS_PER_RUN: u64 = 3;
/// Tool calls of one `agents` run.
const AGENTS_TOOL_CALLS_PER_RUN: u64 = 2;
/// The model id the `agents` runs ask for (the fake server echoes it).
const AGENTS_MODEL: &str = "claude-haiku-4-5";
/// One MiB, for RSS figures.
const MIB: f64 = 1024.0 * 1024.0;

/// What the `fsync` workload measured.
#[derive(Debug, Serialize)]
struct FsyncResult {
    /// Writes made (each 4 KiB + fdatasync).
    writes: u64,
    /// Total time, in seconds.
    secs: f64,
    /// Writes + fdatasync per second.
    commits_per_sec: f64,
    /// Median latency of one write + fdatasync, in milliseconds.
    p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    p99_ms: f64,
    /// Worst latency, in milliseconds.
    max_ms: f64,
    /// For reference: the same 4 KiB writes through an `O_DIRECT | O_DSYNC` handle (durable
    /// when the write returns; how the store's log writes), per second; `None` where the file
    /// system refuses direct I/O. The targets use `commits_per_sec`.
    direct_commits_per_sec: Option<f64>,
    /// The same direct writes from two threads at once (each its own blocks), in total per
    /// second: how much a second durable write in flight would add on this device.
    direct_two_writers_per_sec: Option<f64>,
    /// The headline rate of every round, in the order run (the figures above are the median
    /// round's).
    round_rates: Vec<f64>,
}

/// What the `seq` workload measured.
#[derive(Debug, Serialize)]
struct SeqResult {
    /// Steps of the workflow.
    steps: u32,
    /// From start to completion, in seconds.
    secs: f64,
    /// Steps per second.
    steps_per_sec: f64,
    /// Group commits written during the run.
    commits: u64,
    /// Of those, the commits the workflow's own thread made (the leader path: no hand-off to
    /// the writer thread and back).
    leader_commits: u64,
    /// Events written during the run.
    events: u64,
    /// Events per group commit.
    events_per_commit: f64,
    /// Durable writes of the write-ahead log during the run (`WriterStats::syncs`).
    fsyncs: u64,
    /// Size of the store file after the run.
    file_bytes: u64,
    /// File size divided by steps.
    bytes_per_step: f64,
    /// The headline rate of every round, in the order run (the figures above are the median
    /// round's).
    round_rates: Vec<f64>,
}

/// What the `many` workload measured.
#[derive(Debug, Serialize)]
struct ManyResult {
    /// Workflows started at once.
    workflows: u32,
    /// Steps of each workflow.
    steps_per_workflow: u32,
    /// From the first start to the last completion, in seconds.
    secs: f64,
    /// Workflows completed per second.
    workflows_per_sec: f64,
    /// Steps per second, over all workflows.
    steps_per_sec: f64,
    /// Group commits written during the run.
    commits: u64,
    /// Events written during the run.
    events: u64,
    /// Events per group commit.
    events_per_commit: f64,
    /// Durable writes of the write-ahead log during the run (`WriterStats::syncs`) (one covers every batch written while
    /// the previous one ran).
    fsyncs: u64,
    /// The headline rate of every round, in the order run (the figures above are the median
    /// round's).
    round_rates: Vec<f64>,
}

/// What the `replay` workload measured (each time is the median of several repetitions).
#[derive(Debug, Serialize)]
struct ReplayResult {
    /// Events in the history.
    events: u32,
    /// Repetitions of each measurement.
    repetitions: usize,
    /// `Engine::load`: read from redb + decode + fold, in seconds.
    load_secs: f64,
    /// Events per second of `Engine::load`.
    load_events_per_sec: f64,
    /// `fold` over events already in memory, in seconds.
    fold_secs: f64,
    /// Events per second of the fold alone.
    fold_events_per_sec: f64,
    /// Reading the events from redb into memory (no decoding), in seconds.
    read_secs: f64,
    /// Events per second of the read alone.
    read_events_per_sec: f64,
    /// Decoding every event without folding, in seconds.
    decode_secs: f64,
    /// Events per second of decoding alone.
    decode_events_per_sec: f64,
    /// Size of the store file.
    file_bytes: u64,
}

/// What the `recovery` workload measured.
#[derive(Debug, Serialize)]
struct RecoveryResult {
    /// Steps of the workflow.
    steps: u32,
    /// Side-effect lines (step executions) when the child was killed.
    executed_at_kill: u64,
    /// Steps answered from the log after the restart (recorded before the kill).
    steps_recorded_at_kill: u64,
    /// Steps executed after the restart.
    steps_executed_after_restart: u64,
    /// Opening the store after the kill (includes redb's repair), in seconds.
    open_secs: f64,
    /// From the store open until the run is resumed (open + recover + load), in seconds.
    resumed_secs: f64,
    /// From the store open until the run completed, in seconds.
    total_secs: f64,
    /// Step indices that appear more than once in the side-effect file.
    steps_reexecuted: u64,
}

/// What the `fanout` workload measured.
#[derive(Debug, Serialize)]
struct FanoutResult {
    /// Branches of the fan-out (one durable step each).
    branches: u32,
    /// Branches run at once.
    concurrency: u32,
    /// From start to completion (fan-in and run output included), in seconds.
    secs: f64,
    /// Branches per second.
    branches_per_sec: f64,
    /// Group commits written during the run.
    commits: u64,
    /// Group commits per second.
    commits_per_sec: f64,
    /// Events written during the run.
    events: u64,
    /// Events per group commit.
    events_per_commit: f64,
    /// Checkpoints (redb commits of the logged changes) during the run.
    checkpoints: u64,
    /// Durable writes of the write-ahead log during the run (`WriterStats::syncs`).
    fsyncs: u64,
    /// CPU time of the whole bench process during the run (user + system), in seconds.
    cpu_secs: f64,
    /// CPU time of the store's `cairn-writer` thread during the run, in seconds.
    writer_cpu_secs: f64,
    /// The headline rate of every round, in the order run (the figures above are the median
    /// round's).
    round_rates: Vec<f64>,
}

/// What the `fanout-large` workload measured.
#[derive(Debug, Serialize)]
struct FanoutLargeResult {
    /// Branches of the fan-out.
    branches: u32,
    /// Branches run at once.
    concurrency: u32,
    /// From spawning the child `cairn start fanout` until it exited, in seconds.
    secs: f64,
    /// Branches per second over `secs`.
    branches_per_sec: f64,
    /// The child's peak resident set size (`ru_maxrss` from `wait4`), in bytes.
    peak_rss_bytes: u64,
    /// The child's CPU time (user + system, from `wait4`), in seconds.
    child_cpu_secs: f64,
    /// Events of the finished run.
    events: u64,
    /// `Engine::load` of the finished run (median of several), in seconds.
    load_secs: f64,
    /// Events per second of that load.
    load_events_per_sec: f64,
    /// Size of the store file after the run.
    file_bytes: u64,
}

/// What the `fanout-resume` workload measured.
#[derive(Debug, Serialize)]
struct FanoutResumeResult {
    /// Branches of the fan-out.
    branches: u32,
    /// Branches run at once.
    concurrency: u32,
    /// From spawning the child until the SIGKILL, in seconds.
    secs_to_kill: f64,
    /// Side-effect lines (branch step executions) when the child was killed.
    executed_at_kill: u64,
    /// Branches with a recorded outcome at the kill (answered from the log after the restart).
    outcomes_recorded_at_kill: u64,
    /// Branches whose step was recorded but whose outcome was not, at the kill.
    steps_pending_at_kill: u64,
    /// Branches in flight at the kill with their side effect done: side-effect lines minus
    /// recorded outcomes. Of these, those without a recorded step run again.
    in_flight_at_kill: u64,
    /// Opening the store after the kill (includes redb's repair), in seconds.
    open_secs: f64,
    /// A diagnostic `Engine::load` of the killed run, in seconds (not part of `total_secs`).
    load_secs: f64,
    /// From the store open until `Engine::resume` returned (load diagnostic excluded), in
    /// seconds.
    resumed_secs: f64,
    /// From the store open until the run completed (load diagnostic excluded), in seconds.
    total_secs: f64,
    /// Branch steps executed after the restart.
    steps_executed_after_restart: u64,
    /// Branch indices that appear more than once in the side-effect file.
    branches_rerun: u64,
}

/// What the `agents` workload measured.
#[derive(Debug, Serialize)]
struct AgentsResult {
    /// Agent runs, each 3 model calls and 2 tool calls.
    runs: u32,
    /// Runs at once (the same in both measurements).
    concurrency: u32,
    /// Model calls per measurement (HTTP requests the fake server received).
    model_calls: u64,
    /// Tool calls per measurement.
    tool_calls: u64,
    /// With the engine (durable runs, every model and tool call a recorded step): wall time
    /// from the first start to the last completion, in seconds.
    secs: f64,
    /// Runs completed per second, with the engine.
    runs_per_sec: f64,
    /// Model calls per second, with the engine.
    model_calls_per_sec: f64,
    /// CPU time of this process (fake server included) with the engine, in seconds.
    cpu_secs: f64,
    /// Without the engine (the same model client, tools and loop, nothing recorded): wall
    /// time, in seconds.
    plain_secs: f64,
    /// Runs per second without the engine.
    plain_runs_per_sec: f64,
    /// Model calls per second without the engine.
    plain_model_calls_per_sec: f64,
    /// CPU time of this process without the engine, in seconds.
    plain_cpu_secs: f64,
    /// (secs − plain_secs) / model_calls, in milliseconds.
    overhead_ms_per_model_call: f64,
    /// (cpu_secs − plain_cpu_secs) / model_calls, in milliseconds.
    cpu_overhead_ms_per_model_call: f64,
    /// Events written with the engine.
    events: u64,
    /// Group commits written with the engine.
    commits: u64,
    /// Events per group commit.
    events_per_commit: f64,
    /// Size of the store file after the runs.
    file_bytes: u64,
}

/// A target and whether this run met it.
#[derive(Debug, Serialize)]
struct Target {
    /// Short name of the target.
    name: &'static str,
    /// What is required.
    goal: String,
    /// Met, missed, or `None` when the run lacks a workload it needs.
    met: Option<bool>,
    /// The numbers behind the verdict.
    detail: String,
}

/// Everything one `cairn bench` measured.
#[derive(Debug, Default, Serialize)]
struct Results {
    /// The directory the stores were created in.
    dir: String,
    /// The `fsync` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    fsync: Option<FsyncResult>,
    /// The `seq` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<SeqResult>,
    /// The `many` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    many: Option<ManyResult>,
    /// The `replay` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    replay: Option<ReplayResult>,
    /// The `recovery` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<RecoveryResult>,
    /// The `fanout` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    fanout: Option<FanoutResult>,
    /// The `fanout-large` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    fanout_large: Option<FanoutLargeResult>,
    /// The `fanout-resume` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    fanout_resume: Option<FanoutResumeResult>,
    /// The `agents` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    agents: Option<AgentsResult>,
    /// The `telemetry` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    telemetry: Option<crate::otel_bench::TelemetryResult>,
    /// The `batch` figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<crate::bench_batch::BatchResult>,
    /// The targets, judged on this run's figures.
    targets: Vec<Target>,
}

/// A uniquely named directory for one benchmark, removed when dropped.
struct BenchDir {
    /// The directory.
    path: PathBuf,
}

/// Creating the directory.
impl BenchDir {
    /// Creates `parent` if needed and a fresh directory inside it.
    fn create(parent: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create bench dir {}", parent.display()))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path = parent.join(format!("cairn-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create bench dir {}", path.display()))?;
        // Absolute, so the child process of `recovery` finds the same files.
        let path = path
            .canonicalize()
            .with_context(|| format!("cannot resolve bench dir {}", path.display()))?;
        Ok(BenchDir { path })
    }
}

/// Removes the directory and everything in it.
impl Drop for BenchDir {
    /// Removes the directory, ignoring errors (nothing useful can be done about them here).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs the selected short core workloads (`fsync`, `seq`, `many`, `fanout`) `args.rounds`
/// times, in turn, and keeps each one's median round.
///
/// These workloads take milliseconds to a second each, and this class of machine's disk and CPU
/// drift within minutes: interleaving the rounds measures the ratios between them (the targets)
/// over the same stretch of time, and the median ignores a round that hit a stall.
async fn run_core_rounds(
    args: &BenchArgs,
    selected: &[Workload],
    dir: &Path,
    res: &mut Results,
) -> Result<()> {
    let say = |what: String| {
        if !args.json {
            eprintln!("bench: {what}…");
        }
    };
    let has = |w: Workload| selected.contains(&w);
    let rounds = args.rounds.max(1) as usize;
    let mut fsync = Vec::new();
    let mut seq = Vec::new();
    let mut many = Vec::new();
    let mut fanout = Vec::new();
    let warmup = args.warmup as usize;
    for round in 1..=warmup + rounds {
        // Warm-up rounds run the engine workloads and keep nothing.
        let warm = round <= warmup;
        let of = |what: String| {
            if warm {
                format!("{what}, warm-up")
            } else if rounds > 1 {
                format!("{what}, round {} of {rounds}", round - warmup)
            } else {
                what
            }
        };
        if has(Workload::Fsync) && !warm {
            say(of("fsync (4 KiB write + fdatasync)".into()));
            fsync.push(bench_fsync(dir)?);
        }
        if has(Workload::Seq) {
            say(of(format!(
                "seq ({} sequential steps)",
                fmt_int(args.steps)
            )));
            let r = bench_seq(dir, args.steps).await?;
            if !warm {
                seq.push(r);
            }
        }
        if has(Workload::Many) {
            say(of(format!(
                "many ({} workflows × {} steps)",
                fmt_int(args.workflows),
                fmt_int(args.steps_per_workflow)
            )));
            let r = bench_many(dir, args.workflows, args.steps_per_workflow).await?;
            if !warm {
                many.push(r);
            }
        }
        if has(Workload::Fanout) {
            say(of(format!(
                "fanout ({} branches, {} at a time)",
                fmt_int(args.branches),
                fmt_int(args.concurrency)
            )));
            let r = bench_fanout(dir, args.branches, args.concurrency).await?;
            if !warm {
                fanout.push(r);
            }
        }
    }
    res.fsync = median_round(fsync, |r| r.commits_per_sec, |r, all| r.round_rates = all);
    res.seq = median_round(seq, |r| r.steps_per_sec, |r, all| r.round_rates = all);
    res.many = median_round(many, |r| r.steps_per_sec, |r, all| r.round_rates = all);
    res.fanout = median_round(fanout, |r| r.branches_per_sec, |r, all| r.round_rates = all);
    Ok(())
}

/// The round with the median `rate` (the lower middle one for an even count), carrying every
/// round's rate in run order; `None` for no rounds.
fn median_round<T>(
    rounds: Vec<T>,
    rate: impl Fn(&T) -> f64,
    keep: impl FnOnce(&mut T, Vec<f64>),
) -> Option<T> {
    let all: Vec<f64> = rounds.iter().map(&rate).collect();
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|a, b| all[*a].total_cmp(&all[*b]));
    let pick = *order.get(rounds.len().saturating_sub(1) / 2)?;
    let mut chosen = rounds.into_iter().nth(pick)?;
    keep(&mut chosen, all);
    Some(chosen)
}

/// How the rounds of a workload spread, for the table ("" for a single round).
fn rounds_note(all: &[f64], unit: &str) -> String {
    if all.len() < 2 {
        return String::new();
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "\nmedian of {} rounds ({}–{} {unit})",
        all.len(),
        fmt_rate(lo),
        fmt_rate(hi)
    )
}

/// Runs the selected benchmarks.
pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    if let Some(report) = &args.rusage_report {
        measure_child(report, &args.child_args).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let selected: Vec<Workload> = Workload::value_variants()
        .iter()
        .copied()
        .filter(|w| args.workloads.is_empty() || args.workloads.contains(w))
        .collect();
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = BenchDir::create(&parent)?;
    let mut res = Results {
        dir: dir.path.display().to_string(),
        ..Results::default()
    };
    let say = |what: String| {
        if !args.json {
            eprintln!("bench: {what}…");
        }
    };
    run_core_rounds(&args, &selected, &dir.path, &mut res).await?;
    for w in selected {
        match w {
            // Measured above, in interleaved rounds.
            Workload::Fsync | Workload::Seq | Workload::Many | Workload::Fanout => {}
            Workload::Replay => {
                say(format!("replay ({} events)", fmt_int(args.events)));
                res.replay = Some(bench_replay(&dir.path, args.events).await?);
            }
            Workload::Recovery => {
                say(format!(
                    "recovery ({} steps, SIGKILL at ~40%)",
                    fmt_int(args.recovery_steps)
                ));
                res.recovery = Some(bench_recovery(&dir.path, args.recovery_steps).await?);
            }
            Workload::FanoutLarge => {
                say(format!(
                    "fanout-large ({} branches, {} at a time, in a child process)",
                    fmt_int(args.large_branches),
                    fmt_int(args.large_concurrency)
                ));
                res.fanout_large = Some(
                    bench_fanout_large(&dir.path, args.large_branches, args.large_concurrency)
                        .await?,
                );
            }
            Workload::FanoutResume => {
                say(format!(
                    "fanout-resume ({} branches, {} at a time, SIGKILL at ~50%)",
                    fmt_int(args.resume_branches),
                    fmt_int(args.large_concurrency)
                ));
                res.fanout_resume = Some(
                    bench_fanout_resume(&dir.path, args.resume_branches, args.large_concurrency)
                        .await?,
                );
            }
            Workload::Agents => {
                say(format!(
                    "agents ({} runs of 3 model calls + 2 tool calls, {} at a time, fake \
                     Anthropic server on loopback; with and without the engine)",
                    fmt_int(args.agent_runs),
                    fmt_int(args.agent_concurrency)
                ));
                res.agents =
                    Some(bench_agents(&dir.path, args.agent_runs, args.agent_concurrency).await?);
            }
            Workload::Telemetry => {
                say(format!(
                    "telemetry ({} rounds of seq + many + agents in child processes of {} core rounds each: off ×2, memory, otlp, otlp-all)",
                    args.telemetry_rounds,
                    crate::otel_bench::CHILD_ROUNDS
                ));
                let sizes = crate::otel_bench::Sizes {
                    steps: args.steps,
                    workflows: args.workflows,
                    steps_per_workflow: args.steps_per_workflow,
                    agent_runs: args.agent_runs,
                };
                res.telemetry = Some(
                    crate::otel_bench::bench_telemetry(&dir.path, sizes, args.telemetry_rounds)
                        .await?,
                );
            }
            Workload::Batch => {
                say(format!(
                    "batch ({} items of a workflow file: router + one agent each, {} at a time, \
                     fake Anthropic server on loopback; with and without the engine)",
                    fmt_int(args.batch_items),
                    fmt_int(args.batch_concurrency)
                ));
                res.batch = Some(
                    crate::bench_batch::bench_batch(
                        &dir.path,
                        args.batch_items,
                        args.batch_concurrency,
                    )
                    .await?,
                );
            }
        }
    }
    res.targets = targets(&res);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        print_human(&res);
    }
    Ok(ExitCode::SUCCESS)
}

/// Fails unless the run completed.
fn check_completed(what: &str, out: &RunOutcome) -> Result<()> {
    if out.status != RunStatus::Completed {
        bail!(
            "the {what} run {} ended {}: {}",
            out.run_id,
            out.status,
            out.error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(())
}

/// Events per commit, or 0 if nothing was committed.
fn per_commit(events: u64, commits: u64) -> f64 {
    if commits == 0 {
        0.0
    } else {
        events as f64 / commits as f64
    }
}

/// `n` per `secs`, or 0 for a zero duration.
fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

/// The nearest-rank percentile `p` (0-100) of sorted durations, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// The median of some durations, in seconds.
fn median_secs(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2)
        .map(Duration::as_secs_f64)
        .unwrap_or_default()
}

/// The size of a file, with a clear error.
fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

/// `fsync`: overwrites 4 KiB blocks of a preallocated file, each followed by fdatasync.
fn bench_fsync(dir: &Path) -> Result<FsyncResult> {
    let path = dir.join("fsync.dat");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // Preallocate, so each measured write overwrites blocks that exist (like a database page)
    // and the fdatasync does not also have to persist a new file size.
    let chunk = vec![0u8; 1 << 20];
    let total = FSYNC_FILE_BLOCKS * FSYNC_BLOCK as u64;
    let mut off = 0;
    while off < total {
        file.write_all_at(&chunk, off)
            .with_context(|| format!("cannot write {}", path.display()))?;
        off += chunk.len() as u64;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    let block = vec![0xA5u8; FSYNC_BLOCK];
    let mut lat = Vec::with_capacity(FSYNC_MAX_WRITES);
    let started = Instant::now();
    while lat.len() < FSYNC_MAX_WRITES
        && (lat.len() < FSYNC_MIN_WRITES || started.elapsed() < FSYNC_MAX_TIME)
    {
        let off = (lat.len() as u64 % FSYNC_FILE_BLOCKS) * FSYNC_BLOCK as u64;
        let t = Instant::now();
        file.write_all_at(&block, off)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("cannot fdatasync {}", path.display()))?;
        lat.push(t.elapsed());
    }
    let secs = started.elapsed().as_secs_f64();
    drop(file);
    let direct_commits_per_sec = direct_write_rate(&path, lat.len(), 1);
    let direct_two_writers_per_sec = direct_write_rate(&path, lat.len(), 2);
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    let writes = lat.len() as u64;
    Ok(FsyncResult {
        direct_commits_per_sec,
        direct_two_writers_per_sec,
        round_rates: Vec::new(),
        writes,
        secs,
        commits_per_sec: rate(writes as f64, secs),
        p50_ms: percentile_ms(&lat, 50.0),
        p99_ms: percentile_ms(&lat, 99.0),
        max_ms: percentile_ms(&lat, 100.0),
    })
}

/// `writes` 4 KiB writes over the preallocated file at `path` through an `O_DIRECT | O_DSYNC`
/// handle, shared by `threads` threads writing at once (each its own blocks), per second in
/// total; `None` if the file system refuses direct I/O.
fn direct_write_rate(path: &Path, writes: usize, threads: usize) -> Option<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)
        .ok()?;
    let threads = threads.max(1);
    let each = writes / threads;
    let started = Instant::now();
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let file = &file;
                s.spawn(move || {
                    // A block-aligned 4 KiB buffer (direct I/O needs one).
                    let mut raw = vec![0xA5u8; 2 * FSYNC_BLOCK];
                    let start = raw.as_ptr().align_offset(FSYNC_BLOCK).min(FSYNC_BLOCK);
                    let block = &mut raw[start..start + FSYNC_BLOCK];
                    (0..each).all(|i| {
                        let n = (i * threads + t) as u64;
                        let off = (n % FSYNC_FILE_BLOCKS) * FSYNC_BLOCK as u64;
                        file.write_all_at(block, off).is_ok()
                    })
                })
            })
            .collect();
        handles.into_iter().all(|h| h.join().unwrap_or(false))
    });
    ok.then(|| rate((each * threads) as f64, started.elapsed().as_secs_f64()))
}

/// Opens a fresh store for writing, with a clear error.
fn open_store(path: &Path, durability: Durability) -> Result<RedbStore> {
    RedbStore::open_with(
        path,
        StoreOptions {
            durability,
            ..StoreOptions::default()
        },
    )
    .with_context(|| format!("cannot open store {}", path.display()))
}

/// The input of the built-in `steps` workflow with `steps` steps and ~100-byte outputs.
fn steps_input(steps: u32) -> serde_json::Value {
    json!({ "steps": steps, "payload_bytes": PAYLOAD_BYTES })
}

/// `seq`: one `steps` workflow of `steps` sequential durable steps on a fresh store.
async fn bench_seq(dir: &Path, steps: u32) -> Result<SeqResult> {
    let path = dir.join("seq.redb");
    let store = open_store(&path, Durability::Immediate)?;
    let engine = Engine::new(store.clone(), workflows::registry(Arc::default()));
    let before = store.writer_stats();
    let started = Instant::now();
    let h = engine
        .start_with(StartOptions::new("steps", steps_input(steps)))
        .await
        .context("cannot start the seq workflow")?;
    let out = h.wait().await.context("the seq workflow did not finish")?;
    let secs = started.elapsed().as_secs_f64();
    check_completed("seq", &out)?;
    let after = store.writer_stats();
    drop(engine);
    drop(store);
    let file_bytes = file_len(&path)?;
    let _ = std::fs::remove_file(&path);
    let commits = after.commits - before.commits;
    let events = after.events - before.events;
    Ok(SeqResult {
        round_rates: Vec::new(),
        steps,
        secs,
        steps_per_sec: rate(f64::from(steps), secs),
        commits,
        leader_commits: after.leader_commits - before.leader_commits,
        fsyncs: after.syncs - before.syncs,
        events,
        events_per_commit: per_commit(events, commits),
        file_bytes,
        bytes_per_step: file_bytes as f64 / f64::from(steps),
    })
}

/// `many`: `workflows` `steps` workflows started at once, run concurrently to completion.
async fn bench_many(dir: &Path, workflows: u32, steps: u32) -> Result<ManyResult> {
    let path = dir.join("many.redb");
    let store = open_store(&path, Durability::Immediate)?;
    let engine = Engine::new(store.clone(), workflows::registry(Arc::default()));
    let before = store.writer_stats();
    let started = Instant::now();
    let tasks: Vec<_> = (0..workflows)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let h = engine
                    .start_with(StartOptions::new("steps", steps_input(steps)))
                    .await
                    .context("cannot start a many workflow")?;
                h.wait().await.context("a many workflow did not finish")
            })
        })
        .collect();
    for t in tasks {
        let out = t.await.context("a many benchmark task panicked")??;
        check_completed("many", &out)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let after = store.writer_stats();
    drop(engine);
    drop(store);
    let _ = std::fs::remove_file(&path);
    let commits = after.commits - before.commits;
    let events = after.events - before.events;
    let total_steps = u64::from(workflows) * u64::from(steps);
    Ok(ManyResult {
        round_rates: Vec::new(),
        workflows,
        steps_per_workflow: steps,
        secs,
        workflows_per_sec: rate(f64::from(workflows), secs),
        steps_per_sec: rate(total_steps as f64, secs),
        commits,
        events,
        events_per_commit: per_commit(events, commits),
        fsyncs: after.syncs - before.syncs,
    })
}

/// The `StepCompleted` event of step `i`, shaped like the `steps` workflow's output.
fn step_event(i: u32, pad: &str) -> Result<NewEvent> {
    let output = Payload::from_value(&json!({
        "i": i,
        "square": u64::from(i) * u64::from(i),
        "pad": pad,
    }))?;
    let now = cairn_storage::now_micros();
    let ev = Event::StepCompleted {
        path: StepPath::root().child(i),
        name: "step".into(),
        attempt: 1,
        started_us: now,
        output,
    };
    Ok(NewEvent {
        ts_us: now,
        payload: ev.encode(),
    })
}

/// Writes a run of `events` events (one `RunStarted`, then `StepCompleted`s).
///
/// The appends are all issued before any is awaited, so the group-commit writer packs them into
/// a few fsyncs. (`Durability::None` would be the obvious choice for this setup, but the store
/// refuses non-durable commits in the multi-process `SingleWriter` mode it opens redb in.)
async fn build_history(path: &Path, id: RunId, events: u32) -> Result<()> {
    let store = open_store(path, Durability::Immediate)?;
    let steps = events - 1;
    let start = Event::RunStarted {
        workflow: "steps".into(),
        version: 1,
        input: Payload::from_value(&steps_input(steps))?,
        parent: None,
    };
    store
        .create_run(
            NewRun {
                id,
                workflow: "steps".into(),
                version: 1,
                parent: None,
                labels: Default::default(),
                status: RunStatus::Running,
            },
            vec![NewEvent::now(start.encode())],
        )
        .await
        .context("cannot create the replay run")?;
    let pad = "x".repeat(PAYLOAD_BYTES - 40);
    let mut pending = Vec::new();
    let mut i = 0;
    while i < steps {
        let end = i.saturating_add(REPLAY_BATCH).min(steps);
        let batch = (i..end)
            .map(|k| step_event(k, &pad))
            .collect::<Result<Vec<_>>>()?;
        pending.push(store.append(id, batch, None));
        i = end;
    }
    for p in pending {
        p.await.context("cannot append to the replay run")?;
    }
    Ok(())
}

/// Reads a run's whole history into memory.
async fn read_all(store: &RedbStore, id: RunId) -> Result<Vec<StoredEvent>> {
    let mut out = Vec::new();
    let mut from = Seq(0);
    loop {
        let page = store
            .read(id, from, REPLAY_PAGE)
            .await
            .context("cannot read the replay run")?;
        let Some(last) = page.last() else { break };
        from = Seq(last.seq.0 + 1);
        out.extend(page);
    }
    Ok(out)
}

/// `replay`: builds a history of `events` events, then times `Engine::load`, the read, the
/// decoding and the fold separately.
async fn bench_replay(dir: &Path, events: u32) -> Result<ReplayResult> {
    let path = dir.join("replay.redb");
    let id = RunId::new();
    build_history(&path, id, events).await?;
    let store = open_store(&path, Durability::Immediate)?;
    let engine = Engine::new(store.clone(), Registry::new());
    let n = f64::from(events);
    let expect = |state: &cairn_engine::RunState| -> Result<()> {
        if state.events != u64::from(events) || state.steps.len() != events as usize - 1 {
            bail!(
                "the replay fold saw {} events and {} steps, expected {events} and {}",
                state.events,
                state.steps.len(),
                events - 1
            );
        }
        Ok(())
    };

    let mut load = Vec::with_capacity(REPLAY_REPS);
    for _ in 0..REPLAY_REPS {
        let t = Instant::now();
        let state = engine
            .load(id)
            .await
            .context("cannot load the replay run")?;
        load.push(t.elapsed());
        expect(&state)?;
        drop(std::hint::black_box(state));
    }

    let mut read = Vec::with_capacity(REPLAY_REPS);
    let mut history = Vec::new();
    for _ in 0..REPLAY_REPS {
        let t = Instant::now();
        history = read_all(&store, id).await?;
        read.push(t.elapsed());
    }
    if history.len() != events as usize {
        bail!(
            "read {} events of the replay run, expected {events}",
            history.len()
        );
    }

    let mut decode = Vec::with_capacity(REPLAY_REPS);
    for _ in 0..REPLAY_REPS {
        let t = Instant::now();
        for e in &history {
            let ev = Event::decode(&e.payload)
                .map_err(|err| anyhow!("event {} does not decode: {err}", e.seq))?;
            std::hint::black_box(ev);
        }
        decode.push(t.elapsed());
    }

    let mut folds = Vec::with_capacity(REPLAY_REPS);
    for _ in 0..REPLAY_REPS {
        let t = Instant::now();
        let state = fold(id, &history).context("cannot fold the replay run")?;
        folds.push(t.elapsed());
        expect(&state)?;
        drop(std::hint::black_box(state));
    }

    drop(engine);
    drop(store);
    let file_bytes = file_len(&path)?;
    let _ = std::fs::remove_file(&path);
    let (load_secs, fold_secs) = (median_secs(load), median_secs(folds));
    let (read_secs, decode_secs) = (median_secs(read), median_secs(decode));
    Ok(ReplayResult {
        events,
        repetitions: REPLAY_REPS,
        load_secs,
        load_events_per_sec: rate(n, load_secs),
        fold_secs,
        fold_events_per_sec: rate(n, fold_secs),
        read_secs,
        read_events_per_sec: rate(n, read_secs),
        decode_secs,
        decode_events_per_sec: rate(n, decode_secs),
        file_bytes,
    })
}

/// A child process that is SIGKILLed and reaped if it is still held when dropped.
struct ChildGuard {
    /// The child, until it has been reaped.
    child: Option<Child>,
}

/// Kills a child that is still running, so no process outlives the benchmark.
impl Drop for ChildGuard {
    /// SIGKILLs and reaps the child if it is still held.
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines in a file (0 if it does not exist yet).
fn count_lines(path: &Path) -> Result<u64> {
    match std::fs::read(path) {
        Ok(b) => Ok(b.iter().filter(|&&c| c == b'\n').count() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `recovery`: runs a `steps` workflow in a child `cairn`, SIGKILLs it at ~40% of its steps,
/// then resumes it here and counts the steps that executed twice.
async fn bench_recovery(dir: &Path, steps: u32) -> Result<RecoveryResult> {
    let store_path = dir.join("recovery.redb");
    let side = dir.join("recovery.side");
    let side_str = side
        .to_str()
        .with_context(|| format!("the bench dir {} is not valid UTF-8", dir.display()))?;
    let input = json!({ "steps": steps, "side_effects": side_str }).to_string();
    let exe = std::env::current_exe().context("cannot find the cairn executable for the child")?;
    let child = Command::new(&exe)
        .arg("--store")
        .arg(&store_path)
        .args(["start", "steps", "--input", &input])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start the child {}", exe.display()))?;
    let mut guard = ChildGuard { child: Some(child) };
    let kill_at = (u64::from(steps) * 2).div_ceil(5);
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        let n = count_lines(&side)?;
        if n >= kill_at {
            break;
        }
        let Some(child) = guard.child.as_mut() else {
            bail!("the recovery child is gone");
        };
        if let Some(status) = child.try_wait().context("cannot poll the recovery child")? {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut err);
            }
            guard.child = None;
            bail!(
                "the recovery child exited ({status}) after {n} of {steps} steps, before the \
                 kill at {kill_at}: {}",
                err.trim()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the recovery child executed only {n} of {steps} steps in {}s",
                RECOVERY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let Some(mut child) = guard.child.take() else {
        bail!("the recovery child is gone");
    };
    let pid = libc::pid_t::try_from(child.id()).context("the child's pid does not fit pid_t")?;
    // SAFETY: kill(2) with the pid of a child we spawned and have not reaped, so the pid cannot
    // have been reused by another process.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        guard.child = Some(child);
        return Err(e).context("cannot SIGKILL the recovery child");
    }
    let status = child.wait().context("cannot reap the recovery child")?;
    if status.signal() != Some(libc::SIGKILL) {
        bail!("the recovery child ended ({status}) before the SIGKILL landed");
    }
    let executed_at_kill = count_lines(&side)?;

    // The restart: open the store, find the interrupted run, resume it, run it to the end.
    let t0 = Instant::now();
    let store = open_store(&store_path, Durability::Immediate)?;
    let open_secs = t0.elapsed().as_secs_f64();
    let engine = Engine::new(store.clone(), workflows::registry(Arc::default()));
    let recovered = engine
        .recover()
        .await
        .context("cannot recover the killed run")?;
    let resumed_secs = t0.elapsed().as_secs_f64();
    if let Some((id, e)) = recovered.failed.into_iter().next() {
        return Err(e).with_context(|| format!("cannot resume the killed run {id}"));
    }
    let mut handles = recovered.handles;
    let Some(h) = handles.pop() else {
        bail!("no interrupted run found after the kill");
    };
    if !handles.is_empty() {
        bail!("{} interrupted runs found, expected 1", handles.len() + 1);
    }
    let out = h.wait().await.context("the resumed run did not finish")?;
    let total_secs = t0.elapsed().as_secs_f64();
    check_completed("recovery", &out)?;
    drop(engine);
    drop(store);

    let text = std::fs::read_to_string(&side)
        .with_context(|| format!("cannot read {}", side.display()))?;
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for line in text.lines() {
        let i: u32 = line
            .trim()
            .parse()
            .with_context(|| format!("bad line `{line}` in {}", side.display()))?;
        *seen.entry(i).or_default() += 1;
    }
    if let Some(missing) = (0..steps).find(|i| !seen.contains_key(i)) {
        bail!("step {missing} never executed in the recovery run");
    }
    let steps_reexecuted = seen.values().filter(|&&c| c > 1).count() as u64;
    let _ = std::fs::remove_file(&store_path);
    let _ = std::fs::remove_file(&side);
    Ok(RecoveryResult {
        steps,
        executed_at_kill,
        steps_recorded_at_kill: out.steps_replayed,
        steps_executed_after_restart: out.steps_executed,
        open_secs,
        resumed_secs,
        total_secs,
        steps_reexecuted,
    })
}

/// Σ i² for i in 0..n: the `sum` a `fanout` run reports when every branch succeeds, or `None`
/// if it does not fit a `u64` (over about 3.8 million branches).
fn sum_of_squares(n: u32) -> Option<u64> {
    let n = u128::from(n);
    let s = if n == 0 {
        0
    } else {
        (n - 1) * n * (2 * n - 1) / 6
    };
    u64::try_from(s).ok()
}

/// Fails unless a `fanout` run's output says every branch succeeded and `sum` = Σ i².
fn check_fanout_output(
    what: &str,
    output: Option<&serde_json::Value>,
    branches: u32,
) -> Result<()> {
    let Some(v) = output else {
        bail!("the {what} run completed without an output");
    };
    let expect = sum_of_squares(branches)
        .with_context(|| format!("Σ i² over {branches} branches does not fit a u64"))?;
    let field = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    if field("sum") != Some(expect)
        || field("succeeded") != Some(u64::from(branches))
        || field("failed") != Some(0)
    {
        bail!(
            "the {what} run's output {v} is wrong: expected {branches} branches succeeded, \
             0 failed and sum {expect} (Σ i² for i < {branches})"
        );
    }
    Ok(())
}

/// Seconds in a `timeval`.
fn timeval_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU time (user + system) of this process so far, in seconds (0 if `getrusage` fails).
pub(crate) fn process_cpu_secs() -> f64 {
    // SAFETY: `rusage` is plain data, for which all zero bytes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) writes one `rusage` through a pointer valid for writes.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    timeval_secs(ru.ru_utime) + timeval_secs(ru.ru_stime)
}

/// CPU time of each `cairn-writer` thread of this process, in seconds, by thread id.
///
/// Reads the thread's CPU clock (`clock_gettime` on the clock id Linux derives from a thread
/// id, nanosecond resolution) and falls back to `/proc/self/task/<tid>/stat` (clock ticks).
fn writer_threads_cpu() -> HashMap<i32, f64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let p = e.path();
        match std::fs::read_to_string(p.join("comm")) {
            Ok(comm) if comm.trim() == "cairn-writer" => {}
            _ => continue,
        }
        // Linux's MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED): per-thread, scheduler time.
        let clock: libc::clockid_t = (!tid << 3) | 6;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) writes one `timespec` through a pointer valid for writes; an
        // unknown clock id (a thread that has exited) is reported as an error, not UB.
        let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
        let secs = if rc == 0 {
            ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
        } else {
            let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
                continue;
            };
            // The fields after the `(comm)` one: state is field 3, utime 14 and stime 15.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let f: Vec<f64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            // SAFETY: sysconf(3) only reads a configuration value.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            f.iter().sum::<f64>() / hz
        };
        out.insert(tid, secs);
    }
    out
}

/// The CPU time `cairn-writer` threads used between two [`writer_threads_cpu`] snapshots.
fn writer_cpu_delta(before: &HashMap<i32, f64>, after: &HashMap<i32, f64>) -> f64 {
    after
        .iter()
        .map(|(tid, s)| s - before.get(tid).copied().unwrap_or(0.0))
        .filter(|d| *d > 0.0)
        .sum()
}

/// `fanout`: one `fanout` workflow of `branches` one-step branches, `concurrency` at a time,
/// in this process; checks the fan-in sum.
async fn bench_fanout(dir: &Path, branches: u32, concurrency: u32) -> Result<FanoutResult> {
    let path = dir.join("fanout.redb");
    let store = open_store(&path, Durability::Immediate)?;
    let engine = Engine::new(store.clone(), workflows::registry(Arc::default()));
    let input = json!({ "branches": branches, "concurrency": concurrency });
    let before = store.writer_stats();
    let writer_before = writer_threads_cpu();
    let cpu_before = process_cpu_secs();
    let started = Instant::now();
    let h = engine
        .start_with(StartOptions::new("fanout", input))
        .await
        .context("cannot start the fanout workflow")?;
    let out = h
        .wait()
        .await
        .context("the fanout workflow did not finish")?;
    let secs = started.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu_before;
    let writer_cpu_secs = writer_cpu_delta(&writer_before, &writer_threads_cpu());
    let after = store.writer_stats();
    check_completed("fanout", &out)?;
    check_fanout_output("fanout", out.output.as_ref(), branches)?;
    drop(engine);
    drop(store);
    let _ = std::fs::remove_file(&path);
    let commits = after.commits - before.commits;
    let events = after.events - before.events;
    Ok(FanoutResult {
        round_rates: Vec::new(),
        branches,
        concurrency,
        secs,
        branches_per_sec: rate(f64::from(branches), secs),
        commits,
        commits_per_sec: rate(commits as f64, secs),
        events,
        events_per_commit: per_commit(events, commits),
        checkpoints: after.checkpoints - before.checkpoints,
        fsyncs: after.syncs - before.syncs,
        cpu_secs,
        writer_cpu_secs,
    })
}

/// `cairn --store <store> <rest…>` as arguments.
fn store_args(store: &Path, rest: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["--store".into(), store.into()];
    v.extend(rest.iter().map(OsString::from));
    v
}

/// Starts this same binary with `args`, its stdout and stderr going to the files `out` and
/// `err`.
fn spawn_cairn(args: &[OsString], out: &Path, err: &Path) -> Result<ChildGuard> {
    let exe = std::env::current_exe().context("cannot find the cairn executable for the child")?;
    let file = |p: &Path| {
        std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))
    };
    let child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(out)?)
        .stderr(file(err)?)
        .spawn()
        .with_context(|| format!("cannot start the child {}", exe.display()))?;
    Ok(ChildGuard { child: Some(child) })
}

/// How a child process ended, as `wait4` reported it.
struct ChildExit {
    /// The wait status.
    status: libc::c_int,
    /// Its peak resident set size (`ru_maxrss`), in bytes.
    peak_rss_bytes: u64,
    /// Its CPU time (user + system), in seconds.
    cpu_secs: f64,
}

/// Reading the wait status.
impl ChildExit {
    /// Whether the child exited with status 0.
    fn success(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    /// The signal that killed the child, if one did.
    fn signal(&self) -> Option<libc::c_int> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status))
    }

    /// The status for messages.
    fn describe(&self) -> String {
        match self.signal() {
            Some(s) => format!("killed by signal {s}"),
            None if libc::WIFEXITED(self.status) => {
                format!("exit status {}", libc::WEXITSTATUS(self.status))
            }
            None => format!("wait status {:#x}", self.status),
        }
    }
}

/// Waits (polling `wait4` with `WNOHANG`) until the guarded child exits, reaps it and returns
/// its status and resource usage. Fails after `timeout`; the guard then kills the child.
async fn wait_child(guard: &mut ChildGuard, timeout: Duration, what: &str) -> Result<ChildExit> {
    let Some(child) = guard.child.as_ref() else {
        bail!("the {what} child is gone");
    };
    let pid = libc::pid_t::try_from(child.id()).context("the child's pid does not fit pid_t")?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `rusage` is plain data, for which all zero bytes is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4(2) on the pid of a child we spawned and have not reaped, with pointers
        // to a status and a rusage that are valid for writes.
        let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if rc == pid {
            // Reaped: the guard must not kill or wait for this pid again.
            guard.child = None;
            let kib = u64::try_from(ru.ru_maxrss).unwrap_or_default();
            return Ok(ChildExit {
                status,
                peak_rss_bytes: kib * 1024,
                cpu_secs: timeval_secs(ru.ru_utime) + timeval_secs(ru.ru_stime),
            });
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("cannot wait for the {what} child"));
            }
        }
        if Instant::now() > deadline {
            bail!("the {what} child did not finish in {}s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The end of a child's stderr file, for error messages.
fn stderr_tail(err: &Path) -> String {
    let text = std::fs::read_to_string(err).unwrap_or_default();
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(999)
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[start..].replace('\n', " | ")
}

/// The run id a child `cairn start` printed (`run <id> started: …`).
fn started_run_id(stdout: &str) -> Result<RunId> {
    stdout
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("run ")?;
            let (id, tail) = rest.split_once(' ')?;
            tail.starts_with("started")
                .then(|| id.parse::<RunId>().ok())?
        })
        .with_context(|| format!("the child printed no `run <id> started` line: {stdout:?}"))
}

/// The run output a child `cairn start` or `resume` printed (`output: <json>`).
fn printed_output(stdout: &str) -> Result<serde_json::Value> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("output: "))
        .with_context(|| format!("the child printed no `output:` line: {stdout:?}"))?;
    serde_json::from_str(line).with_context(|| format!("the child's output is not JSON: {line}"))
}

/// What the `--rusage-report` helper writes about the child it ran.
#[derive(Debug, Serialize, Deserialize)]
struct ChildReport {
    /// The wait status from `wait4`.
    status: libc::c_int,
    /// From spawning the child until reaping it, in seconds.
    secs: f64,
    /// The child's `ru_maxrss`, in bytes.
    peak_rss_bytes: u64,
    /// The helper's own peak RSS (`VmHWM`) when it spawned the child, in bytes. Linux counts it
    /// in the child's `ru_maxrss`, so that is the child's own peak only when it is larger.
    floor_bytes: u64,
    /// The child's CPU time (user + system), in seconds.
    cpu_secs: f64,
}

/// This process's peak resident set size (`VmHWM` in `/proc/self/status`), in bytes (0 if it
/// cannot be read).
fn own_peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The `--rusage-report` helper: runs `cairn <args…>` as a child (sharing this process's stdin,
/// stdout and stderr, and SIGKILLed if this process dies), reaps it with `wait4` and writes a
/// [`ChildReport`] to `report`.
async fn measure_child(report: &Path, args: &[OsString]) -> Result<()> {
    let floor_bytes = own_peak_rss_bytes();
    let exe = std::env::current_exe().context("cannot find the cairn executable for the child")?;
    let mut cmd = Command::new(&exe);
    cmd.args(args);
    let parent = libc::pid_t::try_from(std::process::id()).context("our pid does not fit pid_t")?;
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2) and
    // getppid(2), which are async-signal-safe, and allocates nothing (raw OS errors only).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The helper died before the prctl took effect: do not run unsupervised.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start the child {}", exe.display()))?;
    let mut guard = ChildGuard { child: Some(child) };
    let exit = wait_child(&mut guard, FANOUT_CHILD_TIMEOUT, "measured").await?;
    let r = ChildReport {
        status: exit.status,
        secs: started.elapsed().as_secs_f64(),
        peak_rss_bytes: exit.peak_rss_bytes,
        floor_bytes,
        cpu_secs: exit.cpu_secs,
    };
    std::fs::write(report, serde_json::to_vec(&r)?)
        .with_context(|| format!("cannot write {}", report.display()))
}

/// `fanout-large`: a `fanout` workflow of `branches` branches run to completion by a child
/// `cairn start fanout`, which a `cairn bench --rusage-report` helper spawns and reaps with
/// `wait4` for its peak RSS; then `Engine::load` of the finished run, here.
async fn bench_fanout_large(
    dir: &Path,
    branches: u32,
    concurrency: u32,
) -> Result<FanoutLargeResult> {
    let store_path = dir.join("fanout-large.redb");
    let (out_path, err_path) = (dir.join("fanout-large.out"), dir.join("fanout-large.err"));
    let input = json!({ "branches": branches, "concurrency": concurrency }).to_string();
    // Through a fresh `cairn bench --rusage-report` helper: Linux carries the peak RSS of the
    // process a child was spawned from into the child's `ru_maxrss`, and this process is large
    // by now (the `replay` history), while the helper is small.
    let report_path = dir.join("fanout-large.rusage.json");
    let mut args: Vec<OsString> = vec![
        "bench".into(),
        "--rusage-report".into(),
        report_path.clone().into(),
        "--".into(),
    ];
    args.extend(store_args(
        &store_path,
        &["start", "fanout", "--input", &input],
    ));
    let mut guard = spawn_cairn(&args, &out_path, &err_path)?;
    let helper = wait_child(
        &mut guard,
        FANOUT_CHILD_TIMEOUT + Duration::from_secs(60),
        "fanout-large helper",
    )
    .await?;
    if !helper.success() {
        bail!(
            "the fanout-large helper ended ({}): {}",
            helper.describe(),
            stderr_tail(&err_path)
        );
    }
    let report: ChildReport = serde_json::from_slice(
        &std::fs::read(&report_path)
            .with_context(|| format!("cannot read {}", report_path.display()))?,
    )
    .with_context(|| format!("{} is not a child report", report_path.display()))?;
    let exit = ChildExit {
        status: report.status,
        peak_rss_bytes: report.peak_rss_bytes,
        cpu_secs: report.cpu_secs,
    };
    if !exit.success() {
        bail!(
            "the fanout-large child ended ({}): {}",
            exit.describe(),
            stderr_tail(&err_path)
        );
    }
    if report.peak_rss_bytes <= report.floor_bytes {
        bail!(
            "the fanout-large child's peak RSS ({} bytes) is not above the {} bytes it was \
             spawned with, so it cannot be told apart from its parent's",
            report.peak_rss_bytes,
            report.floor_bytes
        );
    }
    let secs = report.secs;
    let stdout = std::fs::read_to_string(&out_path)
        .with_context(|| format!("cannot read {}", out_path.display()))?;
    let id = started_run_id(&stdout)?;
    check_fanout_output("fanout-large", Some(&printed_output(&stdout)?), branches)?;

    let store = open_store(&store_path, Durability::Immediate)?;
    let engine = Engine::new(store.clone(), Registry::new());
    let mut loads = Vec::with_capacity(REPLAY_REPS);
    let mut events = 0;
    for _ in 0..REPLAY_REPS {
        let t = Instant::now();
        let state = engine
            .load(id)
            .await
            .context("cannot load the fanout-large run")?;
        loads.push(t.elapsed());
        let fo = state.fanouts.values().next();
        if state.status != RunStatus::Completed
            || state.fanouts.len() != 1
            || fo.is_none_or(|f| f.succeeded != branches)
            || !state.steps.is_empty()
        {
            bail!(
                "the loaded fanout-large run is {} with {} fan-out(s), {} succeeded branches and \
                 {} remembered steps; expected completed, 1, {branches} and 0",
                state.status,
                state.fanouts.len(),
                fo.map_or(0, |f| f.succeeded),
                state.steps.len()
            );
        }
        events = state.events;
        drop(std::hint::black_box(state));
    }
    drop(engine);
    drop(store);
    let file_bytes = file_len(&store_path)?;
    for p in [&store_path, &out_path, &err_path, &report_path] {
        let _ = std::fs::remove_file(p);
    }
    let load_secs = median_secs(loads);
    Ok(FanoutLargeResult {
        branches,
        concurrency,
        secs,
        branches_per_sec: rate(f64::from(branches), secs),
        peak_rss_bytes: exit.peak_rss_bytes,
        child_cpu_secs: exit.cpu_secs,
        events,
        load_secs,
        load_events_per_sec: rate(events as f64, load_secs),
        file_bytes,
    })
}

/// Counts the lines of a file another process appends to, reading only what is new each time.
struct LineCounter {
    /// The file.
    path: PathBuf,
    /// The open file, once it exists.
    file: Option<std::fs::File>,
    /// Lines counted so far.
    lines: u64,
    /// The read buffer.
    buf: Vec<u8>,
}

/// Polling the file.
impl LineCounter {
    /// A counter for `path` (which need not exist yet).
    fn new(path: &Path) -> Self {
        LineCounter {
            path: path.to_path_buf(),
            file: None,
            lines: 0,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Reads what was appended since the last call and returns the lines so far.
    fn poll(&mut self) -> Result<u64> {
        use std::io::Read;
        if self.file.is_none() {
            match std::fs::File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot open {}", self.path.display()));
                }
            }
        }
        if let Some(f) = self.file.as_mut() {
            loop {
                let n = f
                    .read(&mut self.buf)
                    .with_context(|| format!("cannot read {}", self.path.display()))?;
                if n == 0 {
                    break;
                }
                self.lines += self.buf[..n].iter().filter(|&&c| c == b'\n').count() as u64;
            }
        }
        Ok(self.lines)
    }
}

/// `fanout-resume`: a `fanout` workflow of `branches` branches with a side-effect file, run by
/// a child `cairn start fanout`, SIGKILLed once half the branches have run their step, then
/// resumed here with `Engine::resume`; counts the branches whose step ran twice.
async fn bench_fanout_resume(
    dir: &Path,
    branches: u32,
    concurrency: u32,
) -> Result<FanoutResumeResult> {
    let store_path = dir.join("fanout-resume.redb");
    let side = dir.join("fanout-resume.side");
    let (out_path, err_path) = (dir.join("fanout-resume.out"), dir.join("fanout-resume.err"));
    let side_str = side
        .to_str()
        .with_context(|| format!("the bench dir {} is not valid UTF-8", dir.display()))?;
    let input = json!({
        "branches": branches,
        "concurrency": concurrency,
        "side_effects": side_str,
    })
    .to_string();
    let started = Instant::now();
    let mut guard = spawn_cairn(
        &store_args(&store_path, &["start", "fanout", "--input", &input]),
        &out_path,
        &err_path,
    )?;
    let kill_at = u64::from(branches).div_ceil(2);
    let deadline = started + FANOUT_CHILD_TIMEOUT;
    let mut lines = LineCounter::new(&side);
    loop {
        let n = lines.poll()?;
        if n >= kill_at {
            break;
        }
        let Some(child) = guard.child.as_mut() else {
            bail!("the fanout-resume child is gone");
        };
        if let Some(status) = child
            .try_wait()
            .context("cannot poll the fanout-resume child")?
        {
            guard.child = None;
            bail!(
                "the fanout-resume child exited ({status}) after {n} of {branches} branches, \
                 before the kill at {kill_at}: {}",
                stderr_tail(&err_path)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the fanout-resume child ran only {n} of {branches} branches in {}s",
                FANOUT_CHILD_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(FANOUT_POLL).await;
    }
    let Some(child) = guard.child.as_ref() else {
        bail!("the fanout-resume child is gone");
    };
    let pid = libc::pid_t::try_from(child.id()).context("the child's pid does not fit pid_t")?;
    // SAFETY: kill(2) with the pid of a child we spawned and have not reaped, so the pid cannot
    // have been reused by another process.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot SIGKILL the fanout-resume child");
    }
    let exit = wait_child(&mut guard, FANOUT_CHILD_TIMEOUT, "fanout-resume").await?;
    let secs_to_kill = started.elapsed().as_secs_f64();
    if exit.signal() != Some(libc::SIGKILL) {
        bail!(
            "the fanout-resume child ended ({}) before the SIGKILL landed",
            exit.describe()
        );
    }
    let executed_at_kill = lines.poll()?;
    let stdout = std::fs::read_to_string(&out_path)
        .with_context(|| format!("cannot read {}", out_path.display()))?;
    let id = started_run_id(&stdout)?;

    // The restart: open the store, look at what was recorded (timed apart), resume, finish.
    let t0 = Instant::now();
    let store = open_store(&store_path, Durability::Immediate)?;
    let open_secs = t0.elapsed().as_secs_f64();
    let engine = Engine::new(store.clone(), workflows::registry(Arc::default()));
    let tl = Instant::now();
    let state = engine
        .load(id)
        .await
        .context("cannot load the killed fanout-resume run")?;
    let load = tl.elapsed();
    let load_secs = load.as_secs_f64();
    let outcomes_recorded_at_kill = state
        .fanouts
        .values()
        .map(|f| u64::from(f.succeeded + f.failed))
        .sum();
    let steps_pending_at_kill = state.steps.len() as u64;
    drop(state);
    let h = engine
        .resume(id)
        .await
        .context("cannot resume the killed fanout-resume run")?;
    let resumed_secs = (t0.elapsed() - load).as_secs_f64();
    let out = h
        .wait()
        .await
        .context("the resumed fanout-resume run did not finish")?;
    let total_secs = (t0.elapsed() - load).as_secs_f64();
    check_completed("fanout-resume", &out)?;
    check_fanout_output("fanout-resume", out.output.as_ref(), branches)?;
    drop(engine);
    drop(store);

    let text = std::fs::read_to_string(&side)
        .with_context(|| format!("cannot read {}", side.display()))?;
    let mut seen = vec![0u32; branches as usize];
    for line in text.lines() {
        let i: usize = line
            .trim()
            .parse()
            .with_context(|| format!("bad line `{line}` in {}", side.display()))?;
        let Some(c) = seen.get_mut(i) else {
            bail!("branch {i} in {} is out of range", side.display());
        };
        *c += 1;
    }
    if let Some(missing) = seen.iter().position(|&c| c == 0) {
        bail!("branch {missing} never ran its step in the fanout-resume run");
    }
    let branches_rerun = seen.iter().filter(|&&c| c > 1).count() as u64;
    for p in [&store_path, &side, &out_path, &err_path] {
        let _ = std::fs::remove_file(p);
    }
    Ok(FanoutResumeResult {
        branches,
        concurrency,
        secs_to_kill,
        executed_at_kill,
        outcomes_recorded_at_kill,
        steps_pending_at_kill,
        in_flight_at_kill: executed_at_kill.saturating_sub(outcomes_recorded_at_kill),
        open_secs,
        load_secs,
        resumed_secs,
        total_secs,
        steps_executed_after_restart: out.steps_executed,
        branches_rerun,
    })
}

/// The task of `agents` run `i`, and the final answer the fake server's script gives it.
fn agents_task(i: u32) -> (String, String) {
    let id = format!("T-{:05}", 10_000 + u64::from(i));
    let t = workflows::lookup_ticket(&id);
    let subject = t["subject"].as_str().unwrap_or_default();
    let category = t["category"].as_str().unwrap_or_default();
    let expected = fake_llm::final_text(&id, category, workflows::word_count(subject));
    (
        format!("Triage ticket {id}: look it up and count the words of its subject."),
        expected,
    )
}

/// Runs `f(i)` for every `i` in `0..n` on `concurrency` worker tasks (each takes the next
/// index when it is done with one); fails on the first error.
pub(crate) async fn run_bounded<F, Fut>(n: u32, concurrency: u32, f: F) -> Result<()>
where
    F: Fn(u32) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    use std::sync::atomic::{AtomicU32, Ordering};
    let next = Arc::new(AtomicU32::new(0));
    let f = Arc::new(f);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n) {
        let (next, f) = (Arc::clone(&next), Arc::clone(&f));
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                f(i).await?;
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("a bench worker panicked")??;
    }
    Ok(())
}

/// The agent loop without the engine: the same requests as `Agent` sends (same model id,
/// tools, tool choice and token limit), the same tools, nothing recorded. Returns the final
/// text.
async fn plain_agent_run(
    model: &dyn cairn_agents::Model,
    tools: &cairn_agents::ToolRegistry,
    task: &str,
) -> Result<String> {
    use cairn_agents::{Block, Message, ModelRequest, Role, StopReason, ToolChoice};
    let mut messages = vec![Message::user(task)];
    for _ in 0..cairn_agents::MAX_TURNS_DEFAULT {
        let request = ModelRequest {
            model: AGENTS_MODEL.to_string(),
            system: None,
            messages: messages.clone(),
            tools: tools.specs(),
            tool_choice: Some(ToolChoice::Auto),
            max_tokens: 1024,
            temperature: None,
        };
        let response = model
            .call(request)
            .await
            .map_err(|e| anyhow!("a plain model call failed: {e}"))?;
        messages.push(Message {
            role: Role::Assistant,
            content: response.content.clone(),
        });
        let uses: Vec<(String, String, serde_json::Value)> = response
            .tool_uses()
            .map(|(id, name, input)| (id.to_string(), name.to_string(), input.clone()))
            .collect();
        if response.stop_reason != StopReason::ToolUse || uses.is_empty() {
            return Ok(response.text());
        }
        let mut results = Vec::with_capacity(uses.len());
        for (id, name, input) in uses {
            let (content, is_error) = match tools.get(&name) {
                None => (format!("unknown tool `{name}`"), true),
                Some(t) => match t.call(input).await {
                    Ok(serde_json::Value::String(s)) => (s, false),
                    Ok(v) => (v.to_string(), false),
                    Err(e) => (e.0, true),
                },
            };
            results.push(Block::ToolResult {
                tool_use_id: id,
                content,
                is_error,
            });
        }
        messages.push(Message {
            role: Role::User,
            content: results,
        });
    }
    bail!("a plain agent run used all its turns without finishing")
}

/// `agents`: `runs` agent runs, `concurrency` at a time, against an in-process fake Anthropic
/// server over loopback HTTP: first as a plain loop (no engine), then as durable `agent`
/// workflow runs on a fresh store. Each measurement has its own model client (a cold
/// connection pool); every run's final text is checked.
async fn bench_agents(dir: &Path, runs: u32, concurrency: u32) -> Result<AgentsResult> {
    use cairn_agents::AnthropicModel;
    let fake = fake_llm::FakeLlm::start().await?;
    let url = fake.url();
    let client =
        || AnthropicModel::new(workflows::LOOPBACK_PLACEHOLDER_KEY).with_base_url(url.clone());
    let expected_calls = u64::from(runs) * AGENTS_MODEL_CALLS_PER_RUN;
    let check_calls = |what: &str, n: u64| -> Result<()> {
        if n != expected_calls {
            bail!(
                "the fake server received {n} model calls {what}, expected {expected_calls} \
                 ({AGENTS_MODEL_CALLS_PER_RUN} per run, no retries)"
            );
        }
        Ok(())
    };

    // Without the engine.
    let plain_model: Arc<dyn cairn_agents::Model> = Arc::new(client());
    let tools = workflows::agent_tools();
    let before = fake.requests();
    let cpu_before = process_cpu_secs();
    let started = Instant::now();
    run_bounded(runs, concurrency, move |i| {
        let (model, tools) = (Arc::clone(&plain_model), tools.clone());
        async move {
            let (task, expected) = agents_task(i);
            let text = plain_agent_run(model.as_ref(), &tools, &task).await?;
            if text != expected {
                bail!("plain agent run {i} answered {text:?}, expected {expected:?}");
            }
            Ok(())
        }
    })
    .await?;
    let plain_secs = started.elapsed().as_secs_f64();
    let plain_cpu_secs = process_cpu_secs() - cpu_before;
    check_calls("without the engine", fake.requests() - before)?;

    // With the engine.
    let path = dir.join("agents.redb");
    let store = open_store(&path, Durability::Immediate)?;
    let models = Arc::new(workflows::AgentModels::default());
    models.set(
        workflows::Provider::Anthropic,
        Some(&url),
        Arc::new(client()),
    );
    let mut registry = Registry::new();
    workflows::register_agent(&mut registry, models);
    let engine = Engine::new(store.clone(), registry);
    let stats_before = store.writer_stats();
    let before = fake.requests();
    let cpu_before = process_cpu_secs();
    let started = Instant::now();
    let (e, u) = (engine.clone(), url.clone());
    run_bounded(runs, concurrency, move |i| {
        let (engine, url) = (e.clone(), u.clone());
        async move {
            let (task, expected) = agents_task(i);
            let input = json!({
                "provider": "anthropic",
                "base_url": url,
                "model": AGENTS_MODEL,
                "task": task,
            });
            let h = engine
                .start_with(StartOptions::new("agent", input))
                .await
                .context("cannot start an agent run")?;
            let out = h.wait().await.context("an agent run did not finish")?;
            check_completed("agents", &out)?;
            let o = out.output.unwrap_or_default();
            if o["text"] != expected.as_str()
                || o["turns"] != AGENTS_MODEL_CALLS_PER_RUN
                || o["tool_calls"] != AGENTS_TOOL_CALLS_PER_RUN
            {
                bail!(
                    "agent run {} (task {i}) ended with text {}, {} turns and {} tool calls; \
                     expected {expected:?}, {AGENTS_MODEL_CALLS_PER_RUN} and \
                     {AGENTS_TOOL_CALLS_PER_RUN}",
                    out.run_id,
                    o["text"],
                    o["turns"],
                    o["tool_calls"]
                );
            }
            Ok(())
        }
    })
    .await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu_secs = process_cpu_secs() - cpu_before;
    let stats_after = store.writer_stats();
    check_calls("with the engine", fake.requests() - before)?;
    drop(engine);
    drop(store);
    let file_bytes = file_len(&path)?;
    let _ = std::fs::remove_file(&path);
    let commits = stats_after.commits - stats_before.commits;
    let events = stats_after.events - stats_before.events;
    let calls = expected_calls as f64;
    Ok(AgentsResult {
        runs,
        concurrency,
        model_calls: expected_calls,
        tool_calls: u64::from(runs) * AGENTS_TOOL_CALLS_PER_RUN,
        secs,
        runs_per_sec: rate(f64::from(runs), secs),
        model_calls_per_sec: rate(calls, secs),
        cpu_secs,
        plain_secs,
        plain_runs_per_sec: rate(f64::from(runs), plain_secs),
        plain_model_calls_per_sec: rate(calls, plain_secs),
        plain_cpu_secs,
        overhead_ms_per_model_call: (secs - plain_secs) * 1000.0 / calls,
        cpu_overhead_ms_per_model_call: (cpu_secs - plain_cpu_secs) * 1000.0 / calls,
        events,
        commits,
        events_per_commit: per_commit(events, commits),
        file_bytes,
    })
}

/// Judges the targets on the figures of this run.
fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    let pct = SEQ_TARGET_RATIO * 100.0;
    out.push(match (&r.seq, &r.fsync) {
        (Some(s), Some(f)) => {
            let ratio = rate(s.steps_per_sec, f.commits_per_sec);
            Target {
                name: "seq_vs_fsync",
                goal: format!("seq steps/s ≥ {pct:.0}% of fsync commits/s"),
                met: Some(ratio >= SEQ_TARGET_RATIO),
                detail: format!(
                    "seq {} steps/s is {:.0}% of fsync {} commits/s{}",
                    fmt_rate(s.steps_per_sec),
                    ratio * 100.0,
                    fmt_rate(f.commits_per_sec),
                    per_round(&s.round_rates, &f.round_rates, SEQ_TARGET_RATIO, 100.0, "%")
                ),
            }
        }
        _ => not_measured(
            "seq_vs_fsync",
            format!("seq steps/s ≥ {pct:.0}% of fsync commits/s"),
            "fsync and seq",
        ),
    });
    out.push(match (&r.many, &r.seq) {
        (Some(m), Some(s)) => {
            let ratio = rate(m.steps_per_sec, s.steps_per_sec);
            Target {
                name: "many_vs_seq",
                goal: format!("many steps/s ≥ {MANY_TARGET_RATIO:.0}× seq steps/s"),
                met: Some(ratio >= MANY_TARGET_RATIO),
                detail: format!(
                    "many {} steps/s is {ratio:.1}× seq {} steps/s ({:.1} events per commit){}",
                    fmt_rate(m.steps_per_sec),
                    fmt_rate(s.steps_per_sec),
                    m.events_per_commit,
                    per_round(&m.round_rates, &s.round_rates, MANY_TARGET_RATIO, 1.0, "×")
                ),
            }
        }
        _ => not_measured(
            "many_vs_seq",
            format!("many steps/s ≥ {MANY_TARGET_RATIO:.0}× seq steps/s"),
            "seq and many",
        ),
    });
    let replay_goal = || format!("≥ {} events/s", fmt_rate(REPLAY_TARGET_EPS));
    match &r.replay {
        Some(p) => {
            out.push(Target {
                name: "replay_fold",
                goal: format!("replay fold {}", replay_goal()),
                met: Some(p.fold_events_per_sec >= REPLAY_TARGET_EPS),
                detail: format!(
                    "fold of {} events in {:.1} ms = {} events/s",
                    fmt_int(p.events),
                    p.fold_secs * 1000.0,
                    fmt_rate(p.fold_events_per_sec)
                ),
            });
            out.push(Target {
                name: "replay_load",
                goal: format!("replay load (read + decode + fold) {}", replay_goal()),
                met: Some(p.load_events_per_sec >= REPLAY_TARGET_EPS),
                detail: format!(
                    "Engine::load of {} events in {:.1} ms = {} events/s",
                    fmt_int(p.events),
                    p.load_secs * 1000.0,
                    fmt_rate(p.load_events_per_sec)
                ),
            });
        }
        None => {
            out.push(not_measured(
                "replay_fold",
                format!("replay fold {}", replay_goal()),
                "replay",
            ));
            out.push(not_measured(
                "replay_load",
                format!("replay load (read + decode + fold) {}", replay_goal()),
                "replay",
            ));
        }
    }
    let goal = format!("recovery re-executes ≤ {RECOVERY_TARGET_REEXECUTED} step");
    out.push(match &r.recovery {
        Some(c) => Target {
            name: "recovery",
            goal,
            met: Some(c.steps_reexecuted <= RECOVERY_TARGET_REEXECUTED),
            detail: format!(
                "{} step(s) re-executed after a SIGKILL at {} of {} steps",
                c.steps_reexecuted,
                fmt_int(c.executed_at_kill),
                fmt_int(c.steps)
            ),
        },
        None => not_measured("recovery", goal, "recovery"),
    });
    let goal =
        format!("fanout branches/s ≥ {FANOUT_TARGET_RATIO:.0}× fsync commits/s (group commit)");
    out.push(match (&r.fanout, &r.fsync) {
        (Some(f), Some(d)) => {
            let ratio = rate(f.branches_per_sec, d.commits_per_sec);
            Target {
                name: "fanout_vs_fsync",
                goal,
                met: Some(ratio >= FANOUT_TARGET_RATIO),
                detail: format!(
                    "fanout {} branches/s is {ratio:.1}× fsync {} commits/s ({:.1} events per \
                     commit, {} commits/s){}",
                    fmt_rate(f.branches_per_sec),
                    fmt_rate(d.commits_per_sec),
                    f.events_per_commit,
                    fmt_rate(f.commits_per_sec),
                    per_round(
                        &f.round_rates,
                        &d.round_rates,
                        FANOUT_TARGET_RATIO,
                        1.0,
                        "×"
                    )
                ),
            }
        }
        _ => not_measured("fanout_vs_fsync", goal, "fsync and fanout"),
    });
    let goal = format!("fanout-large peak RSS < {FANOUT_LARGE_TARGET_RSS_MIB:.0} MiB");
    out.push(match &r.fanout_large {
        Some(l) => {
            let mib = l.peak_rss_bytes as f64 / MIB;
            Target {
                name: "fanout_large_rss",
                goal,
                met: Some(mib < FANOUT_LARGE_TARGET_RSS_MIB),
                detail: format!(
                    "peak RSS {mib:.1} MiB for {} branches, {} at a time",
                    fmt_int(l.branches),
                    fmt_int(l.concurrency)
                ),
            }
        }
        None => not_measured("fanout_large_rss", goal, "fanout-large"),
    });
    out.push(match &r.fanout_resume {
        Some(x) => Target {
            name: "fanout_resume",
            goal: format!(
                "fanout-resume re-runs ≤ {} branches (the concurrency: those in flight at the kill)",
                fmt_int(x.concurrency)
            ),
            met: Some(x.branches_rerun <= u64::from(x.concurrency)),
            detail: format!(
                "{} branch(es) re-run of {} in flight at a SIGKILL after {} of {} branches' side \
                 effects ({} outcomes recorded)",
                fmt_int(x.branches_rerun),
                fmt_int(x.in_flight_at_kill),
                fmt_int(x.executed_at_kill),
                fmt_int(x.branches),
                fmt_int(x.outcomes_recorded_at_kill)
            ),
        },
        None => not_measured(
            "fanout_resume",
            "fanout-resume re-runs ≤ the concurrency (the branches in flight at the kill)".into(),
            "fanout-resume",
        ),
    });
    let goal = format!(
        "agents: engine overhead per recorded model call < {AGENTS_TARGET_OVERHEAD_MS:.0} ms"
    );
    out.push(match &r.agents {
        Some(a) => Target {
            name: "agents_overhead",
            goal,
            met: Some(a.overhead_ms_per_model_call < AGENTS_TARGET_OVERHEAD_MS),
            detail: format!(
                "({:.3} s with the engine − {:.3} s without) / {} model calls = {:.3} ms per \
                 call (CPU: {:.3} ms per call)",
                a.secs,
                a.plain_secs,
                fmt_int(a.model_calls),
                a.overhead_ms_per_model_call,
                a.cpu_overhead_ms_per_model_call
            ),
        },
        None => not_measured("agents_overhead", goal, "agents"),
    });
    if let Some(b) = &r.batch {
        for (name, goal, met, detail) in crate::bench_batch::targets(b) {
            out.push(Target {
                name,
                goal,
                met: Some(met),
                detail,
            });
        }
    }
    if let Some(t) = &r.telemetry {
        for (name, goal, met, detail) in crate::otel_bench::targets(t) {
            out.push(Target {
                name,
                goal,
                met,
                detail,
            });
        }
    }
    out
}

/// A target this run cannot judge because it lacks `needs`.
/// With several rounds (which run the workloads in turn), the ratio of each round's rates
/// `num[i] / den[i]` and in how many rounds it reaches `min`, as a note for a target's detail
/// (empty with one round): the spread behind a verdict taken on the medians.
fn per_round(num: &[f64], den: &[f64], min: f64, scale: f64, unit: &str) -> String {
    if num.len() < 2 || num.len() != den.len() {
        return String::new();
    }
    let ratios: Vec<f64> = num.iter().zip(den).map(|(a, b)| rate(*a, *b)).collect();
    let met = ratios.iter().filter(|r| **r >= min).count();
    let shown: Vec<String> = ratios
        .iter()
        .map(|r| format!("{:.1}{unit}", r * scale))
        .collect();
    format!(
        "; met in {met} of {} rounds ({})",
        ratios.len(),
        shown.join(", ")
    )
}

fn not_measured(name: &'static str, goal: String, needs: &str) -> Target {
    Target {
        name,
        goal,
        met: None,
        detail: format!("not measured: needs {needs} in the same run"),
    }
}

/// Prints the results table and the targets for humans.
fn print_human(r: &Results) {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header(["workload", "result", "details"]);
    if let Some(f) = &r.fsync {
        t.add_row([
            "fsync".to_string(),
            format!("{} commits/s", fmt_rate(f.commits_per_sec)),
            format!(
                "{} × 4 KiB write + fdatasync in {:.2} s\np50 {:.2} ms · p99 {:.2} ms · max {:.2} ms{}",
                fmt_int(f.writes),
                f.secs,
                f.p50_ms,
                f.p99_ms,
                f.max_ms,
                f.direct_commits_per_sec
                    .map(|d| format!("\nO_DIRECT|O_DSYNC writes (the log's way): {} /s", fmt_rate(d)))
                    .unwrap_or_default()
                    + &f.direct_two_writers_per_sec
                        .map(|d| format!(" · from two threads at once: {} /s", fmt_rate(d)))
                        .unwrap_or_default()
            ) + &rounds_note(&f.round_rates, "commits/s"),
        ]);
    }
    if let Some(s) = &r.seq {
        t.add_row([
            "seq".to_string(),
            format!("{} steps/s", fmt_rate(s.steps_per_sec)),
            format!(
                "{} sequential steps in {:.2} s · {:.2} events/commit · {} durable log writes \
                 ({} by the workflow's own thread)\n{} on disk = {} bytes/step",
                fmt_int(s.steps),
                s.secs,
                s.events_per_commit,
                fmt_int(s.fsyncs),
                fmt_int(s.leader_commits),
                fmt_bytes(s.file_bytes),
                fmt_int(s.bytes_per_step.round() as u64)
            ) + &rounds_note(&s.round_rates, "steps/s"),
        ]);
    }
    if let Some(m) = &r.many {
        t.add_row([
            "many".to_string(),
            format!(
                "{} steps/s\n{} workflows/s",
                fmt_rate(m.steps_per_sec),
                fmt_rate(m.workflows_per_sec)
            ),
            format!(
                "{} workflows × {} steps in {:.2} s\n{} events in {} commits = {:.1} events/commit \
                 · {} durable log writes",
                fmt_int(m.workflows),
                fmt_int(m.steps_per_workflow),
                m.secs,
                fmt_int(m.events),
                fmt_int(m.commits),
                m.events_per_commit,
                fmt_int(m.fsyncs)
            ) + &rounds_note(&m.round_rates, "steps/s"),
        ]);
    }
    if let Some(p) = &r.replay {
        t.add_row([
            "replay".to_string(),
            format!(
                "fold {} events/s\nload {} events/s",
                fmt_rate(p.fold_events_per_sec),
                fmt_rate(p.load_events_per_sec)
            ),
            format!(
                "{} events ({} on disk), median of {}\nfold {:.1} ms · load {:.1} ms \
                 (read alone {:.1} ms, decode alone {:.1} ms)",
                fmt_int(p.events),
                fmt_bytes(p.file_bytes),
                p.repetitions,
                p.fold_secs * 1000.0,
                p.load_secs * 1000.0,
                p.read_secs * 1000.0,
                p.decode_secs * 1000.0
            ),
        ]);
    }
    if let Some(c) = &r.recovery {
        t.add_row([
            "recovery".to_string(),
            format!(
                "{:.2} s to completion\n{} step(s) re-executed",
                c.total_secs, c.steps_reexecuted
            ),
            format!(
                "SIGKILL after {} of {} steps ({} recorded)\nstore open {:.1} ms · resumed after \
                 {:.1} ms · {} steps executed after restart",
                fmt_int(c.executed_at_kill),
                fmt_int(c.steps),
                fmt_int(c.steps_recorded_at_kill),
                c.open_secs * 1000.0,
                c.resumed_secs * 1000.0,
                fmt_int(c.steps_executed_after_restart)
            ),
        ]);
    }
    if let Some(f) = &r.fanout {
        t.add_row([
            "fanout".to_string(),
            format!("{} branches/s", fmt_rate(f.branches_per_sec)),
            format!(
                "{} one-step branches, {} at a time, in {:.2} s · sum checked\n{} events in {} \
                 commits = {:.1} events/commit · {} commits/s · {} durable log writes · {} checkpoints\nCPU \
                 {:.2} s ({:.0}% of one core) · writer thread {:.2} s",
                fmt_int(f.branches),
                fmt_int(f.concurrency),
                f.secs,
                fmt_int(f.events),
                fmt_int(f.commits),
                f.events_per_commit,
                fmt_rate(f.commits_per_sec),
                fmt_int(f.fsyncs),
                fmt_int(f.checkpoints),
                f.cpu_secs,
                rate(f.cpu_secs, f.secs) * 100.0,
                f.writer_cpu_secs
            ) + &rounds_note(&f.round_rates, "branches/s"),
        ]);
    }
    if let Some(l) = &r.fanout_large {
        t.add_row([
            "fanout-large".to_string(),
            format!(
                "{} branches/s\npeak RSS {:.1} MiB",
                fmt_rate(l.branches_per_sec),
                l.peak_rss_bytes as f64 / MIB
            ),
            format!(
                "{} branches, {} at a time, child process: {:.2} s (CPU {:.2} s) · sum \
                 checked\nEngine::load of the finished run: {} events ({} on disk) in {:.1} ms \
                 = {} events/s",
                fmt_int(l.branches),
                fmt_int(l.concurrency),
                l.secs,
                l.child_cpu_secs,
                fmt_int(l.events),
                fmt_bytes(l.file_bytes),
                l.load_secs * 1000.0,
                fmt_rate(l.load_events_per_sec)
            ),
        ]);
    }
    if let Some(x) = &r.fanout_resume {
        t.add_row([
            "fanout-resume".to_string(),
            format!(
                "{:.2} s to completion\n{} branch(es) re-run",
                x.total_secs,
                fmt_int(x.branches_rerun)
            ),
            format!(
                "SIGKILL after {:.2} s at {} of {} side effects ({} outcomes + {} steps \
                 recorded)\nstore open {:.1} ms · resumed after {:.1} ms · {} steps executed \
                 after restart · sum checked",
                x.secs_to_kill,
                fmt_int(x.executed_at_kill),
                fmt_int(x.branches),
                fmt_int(x.outcomes_recorded_at_kill),
                fmt_int(x.steps_pending_at_kill),
                x.open_secs * 1000.0,
                x.resumed_secs * 1000.0,
                fmt_int(x.steps_executed_after_restart)
            ),
        ]);
    }
    if let Some(a) = &r.agents {
        t.add_row([
            "agents".to_string(),
            format!(
                "{} runs/s\n{} model calls/s\n{:.3} ms overhead/call",
                fmt_rate(a.runs_per_sec),
                fmt_rate(a.model_calls_per_sec),
                a.overhead_ms_per_model_call
            ),
            format!(
                "{} runs × (3 model calls + 2 tool calls), {} at a time, fake Anthropic server \
                 on loopback · texts checked\nengine {:.2} s (CPU {:.2} s) · without the engine \
                 {:.2} s (CPU {:.2} s, {} runs/s)\n{} events in {} commits = {:.1} \
                 events/commit · {} on disk",
                fmt_int(a.runs),
                fmt_int(a.concurrency),
                a.secs,
                a.cpu_secs,
                a.plain_secs,
                a.plain_cpu_secs,
                fmt_rate(a.plain_runs_per_sec),
                fmt_int(a.events),
                fmt_int(a.commits),
                a.events_per_commit,
                fmt_bytes(a.file_bytes)
            ),
        ]);
    }
    if let Some(tel) = &r.telemetry {
        for row in crate::otel_bench::rows(tel) {
            t.add_row(row);
        }
    }
    if let Some(b) = &r.batch {
        t.add_row(crate::bench_batch::row(b));
    }
    println!("stores in {}", r.dir);
    println!("{t}");
    println!();
    println!("targets (ratios measured in this run):");
    for tg in &r.targets {
        let verdict = match tg.met {
            Some(true) => "met    ",
            Some(false) => "MISSED ",
            None => "skipped",
        };
        println!("  {verdict} {}: {}", tg.goal, tg.detail);
    }
}

/// An integer with thousands separators.
fn fmt_int(n: impl Into<u64>) -> String {
    let s = n.into().to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate: thousands separators, one decimal below 100.
fn fmt_rate(x: f64) -> String {
    if !x.is_finite() || x < 0.0 {
        return format!("{x}");
    }
    if x < 100.0 {
        format!("{x:.1}")
    } else {
        fmt_int(x.round() as u64)
    }
}

/// A byte count in KiB or MiB.
fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Unit tests of the formatting and statistics helpers.
#[cfg(test)]
mod tests {
    use super::*;

    /// Thousands separators land every three digits from the right.
    #[test]
    fn formats_integers_with_separators() {
        assert_eq!(fmt_int(0u32), "0");
        assert_eq!(fmt_int(999u32), "999");
        assert_eq!(fmt_int(1000u32), "1,000");
        assert_eq!(fmt_int(1_234_567u64), "1,234,567");
    }

    /// A ratio target's note counts the rounds whose own ratio reaches the goal (rounds pair
    /// up by position: the workloads run in turn), and says nothing about a single round.
    #[test]
    fn per_round_ratios_pair_rounds_by_position() {
        let many = [200_000.0, 150_000.0, 260_000.0];
        let seq = [10_000.0, 10_000.0, 12_000.0];
        assert_eq!(
            per_round(&many, &seq, 20.0, 1.0, "×"),
            "; met in 2 of 3 rounds (20.0×, 15.0×, 21.7×)"
        );
        assert_eq!(
            per_round(&[8_000.0, 9_000.0], &[10_000.0, 10_000.0], 0.7, 100.0, "%"),
            "; met in 2 of 2 rounds (80.0%, 90.0%)"
        );
        assert_eq!(per_round(&[1.0], &[1.0], 1.0, 1.0, "×"), "");
        assert_eq!(per_round(&[1.0, 2.0], &[1.0], 1.0, 1.0, "×"), "");
    }

    /// Percentiles use the nearest rank, and an empty sample gives 0.
    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 100.0), 100.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
    }

    /// The closed form of Σ i² matches the loop, and overflow is reported, not wrapped.
    #[test]
    fn sum_of_squares_matches_the_loop() {
        for n in [0u32, 1, 2, 3, 10, 2000, 100_000] {
            let expect: u64 = (0..u64::from(n)).map(|i| i * i).sum();
            assert_eq!(sum_of_squares(n), Some(expect), "n = {n}");
        }
        assert_eq!(sum_of_squares(u32::MAX), None);
    }

    /// The fanout output check accepts the right sum and rejects a wrong one.
    #[test]
    fn checks_fanout_output() {
        let ok = json!({"branches": 4, "succeeded": 4, "failed": 0, "sum": 14});
        assert!(check_fanout_output("t", Some(&ok), 4).is_ok());
        let bad = json!({"branches": 4, "succeeded": 4, "failed": 0, "sum": 13});
        assert!(check_fanout_output("t", Some(&bad), 4).is_err());
        assert!(check_fanout_output("t", None, 4).is_err());
    }

    /// The median round is picked by its rate (the lower middle one for an even count), and
    /// every round's rate is kept in run order.
    #[test]
    fn picks_the_median_round() {
        let pick = |v: Vec<f64>| median_round(v, |r| *r, |_, _| {}).expect("a round");
        assert_eq!(pick(vec![5.0, 1.0, 9.0]), 5.0);
        assert_eq!(pick(vec![4.0, 1.0, 9.0, 2.0]), 2.0);
        assert_eq!(pick(vec![7.0]), 7.0);
        assert!(median_round(Vec::<f64>::new(), |r| *r, |_, _| {}).is_none());
        let mut kept = Vec::new();
        median_round(vec![3.0, 1.0, 2.0], |r| *r, |_, all| kept = all);
        assert_eq!(kept, vec![3.0, 1.0, 2.0]);
    }

    /// A child's printed run id and output are found among its other lines.
    #[test]
    fn parses_child_stdout() {
        let id = RunId::new();
        let text = format!(
            "run {id} started: fanout\nrun {id} completed (1 steps executed, 0 answered from the log)\noutput: {{\"sum\":1}}\n"
        );
        assert_eq!(started_run_id(&text).ok(), Some(id));
        assert_eq!(printed_output(&text).ok(), Some(json!({"sum": 1})));
        assert!(started_run_id("nothing").is_err());
    }
}
