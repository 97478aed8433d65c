//! The CLI commands: each opens the store (read-only where it only reads, so it works while
//! another process writes), does one thing, and prints for humans or as JSON.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cairn_engine::{CancelOutcome, Engine, Event, RunHandle, RunOutcome, StartOptions};
use cairn_storage::{EventStore, RedbStore, RunFilter, RunId, RunMeta, RunStatus, Seq};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use crate::audit::hex;
use crate::control;
use crate::workflows::{self, Progress};
use crate::{Cli, Command};

/// Opens the store for writing, creating it if needed.
pub fn open_rw(path: &Path) -> Result<RedbStore> {
    Ok(RedbStore::open(path)?)
}

/// Opens an existing store for writing; a missing file is an error, not a new empty store.
pub fn open_existing_rw(path: &Path) -> Result<RedbStore> {
    Ok(RedbStore::open_with(
        path,
        cairn_storage::StoreOptions {
            create: false,
            ..Default::default()
        },
    )?)
}

/// A mistake in how the command was called (exit code 2), as opposed to a failure while
/// doing it (exit code 1).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub(crate) fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// Opens an existing store for reading; works while another process writes to it.
pub fn open_ro(path: &Path) -> Result<RedbStore> {
    Ok(RedbStore::open_read_only(path)?)
}

pub(crate) fn parse_run(s: &str) -> Result<RunId> {
    s.parse::<RunId>().map_err(|e| usage(e.to_string()))
}

pub(crate) async fn meta_of(store: &RedbStore, id: RunId) -> Result<RunMeta> {
    store.run(id).await?.with_context(|| {
        format!(
            "no run {id} in {}; list runs with `cairn runs`",
            store.path().display()
        )
    })
}

/// Formats microseconds since the epoch as a UTC timestamp.
pub fn fmt_ts(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| us.to_string())
}

fn fmt_time(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| us.to_string())
}

fn preview(v: &serde_json::Value, max: usize) -> String {
    let s = v.to_string();
    match s.char_indices().nth(max) {
        None => s,
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let path = cli.store.as_path();
    if !(cli.park_after.is_finite() && cli.park_after >= 0.0) {
        return Err(usage(format!(
            "--park-after must be a number of seconds ≥ 0, not {}",
            cli.park_after
        )));
    }
    PARK_AFTER_MS.store((cli.park_after * 1000.0) as u64, Ordering::Relaxed);
    if cli.max_running == Some(0) {
        return Err(usage("--max-running must be at least 1"));
    }
    MAX_RUNNING.store(cli.max_running.unwrap_or(0), Ordering::Relaxed);
    match cli.command {
        Command::Demo { items, step_ms } => demo(path, items, step_ms).await,
        Command::Start {
            workflow,
            input,
            timeout,
        } => start(path, &workflow, &input, timeout).await,
        Command::Workflows => {
            for (name, version) in workflows::registry(Arc::default()).names() {
                println!("{name} v{version}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs {
            status,
            limit,
            json,
        } => runs(path, status.as_deref(), limit, json).await,
        Command::Show { run, step } => show(path, &run, step.as_deref()).await,
        Command::Events { run, from, follow } => events(path, &run, from, follow).await,
        Command::Replay { run, check: false } => replay(path, &run).await,
        Command::Replay { run, check: true } => replay_check(path, &run).await,
        Command::Verify { run, all } => verify(path, run.as_deref(), all).await,
        Command::Resume {
            run,
            output,
            allow_changed,
        } => resume(path, &run, output, allow_changed).await,
        Command::Follow { run, output } => crate::run::follow_cmd(path, &run, output).await,
        Command::Run {
            file,
            input,
            output,
            param,
            set,
            check,
        } => {
            let args = crate::run::RunArgs {
                file,
                input,
                output,
                params: param,
                sets: set,
                check,
            };
            crate::run::run(path, args).await
        }
        Command::Recover => recover(path).await,
        Command::Cancel { run, reason } => cancel(path, &run, &reason).await,
        Command::Signal { run, name, data } => signal(path, &run, &name, &data).await,
        Command::Worker => worker(path).await,
        Command::Audit { run, json } => crate::audit::audit(path, &run, json).await,
        Command::Export { run, output } => {
            crate::transfer::export(path, &run, output.as_deref()).await
        }
        Command::Import { file } => crate::transfer::import(path, &file).await,
        Command::Review {
            run,
            step,
            done,
            output,
            retry: _,
        } => review(path, &run, &step, done, &output).await,
        Command::Trace(args) => crate::trace::run(path, cli.otlp.as_deref(), args).await,
        Command::Fork(args) => crate::fork::run(path, args).await,
        Command::Bench(args) => crate::bench::run(args).await,
    }
}

/// `--park-after`, in milliseconds, for every engine this process makes.
static PARK_AFTER_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(60_000);

/// `--max-running` for every engine this process makes (0: no limit).
static MAX_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The engine options the global flags (`--park-after`, `--max-running`) ask for.
pub(crate) fn engine_options() -> cairn_engine::EngineOptions {
    let max = MAX_RUNNING.load(Ordering::Relaxed);
    cairn_engine::EngineOptions {
        suspend_after: Duration::from_millis(PARK_AFTER_MS.load(Ordering::Relaxed)),
        max_running: (max > 0).then_some(max),
    }
}

pub(crate) fn engine_for(store: RedbStore, progress: Arc<Progress>) -> Engine {
    Engine::with_options(
        Arc::new(store),
        workflows::registry(progress),
        engine_options(),
    )
}

async fn demo(path: &Path, items: u32, step_ms: u64) -> Result<ExitCode> {
    let store = open_rw(path)?;
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store, Arc::clone(&progress));
    let _control = control::serve(path, engine.clone());
    let input = serde_json::json!({ "items": items, "step_ms": step_ms });
    let h = engine.start_with(StartOptions::new("demo", input)).await?;
    println!(
        "run {} started: demo over {items} tickets (store {})",
        h.id,
        path.display()
    );
    let _ = std::io::stdout().flush();
    let outcomes = drive(&engine, vec![h], Some(progress)).await?;
    Ok(report(path, &outcomes))
}

async fn start(path: &Path, workflow: &str, input: &str, timeout: Option<f64>) -> Result<ExitCode> {
    let timeout = match timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
        Some(t) => {
            return Err(usage(format!(
                "--timeout must be a positive number of seconds, not {t}"
            )));
        }
    };
    let input: serde_json::Value = serde_json::from_str(input)
        .map_err(|e| usage(format!("--input is not valid JSON ({e}): `{input}`")))?;
    // Check the name before creating a store for it.
    let known = workflows::registry(Arc::default()).names();
    if !known.iter().any(|(n, _)| n == workflow) {
        let names: Vec<&str> = known.iter().map(|(n, _)| n.as_str()).collect();
        return Err(usage(format!(
            "no workflow named `{workflow}` is registered (known: {}); see `cairn workflows`",
            names.join(", ")
        )));
    }
    let store = match open_rw(path) {
        Ok(s) => s,
        // A worker holds the store: ask it to start the run.
        Err(e) if is_locked(&e) => {
            let req = control::Request::Start {
                workflow: workflow.to_string(),
                input,
                timeout_secs: timeout.map(|t| t.as_secs_f64()),
                labels: Default::default(),
            };
            return remote(path, &req, e).await;
        }
        Err(e) => return Err(e),
    };
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store, Arc::clone(&progress));
    let _control = control::serve(path, engine.clone());
    let mut opts = StartOptions::new(workflow, input);
    opts.timeout = timeout;
    let h = engine.start_with(opts).await?;
    println!("run {} started: {workflow}", h.id);
    let _ = std::io::stdout().flush();
    let show_progress = (workflow == "demo").then_some(progress);
    let outcomes = drive(&engine, vec![h], show_progress).await?;
    Ok(report(path, &outcomes))
}

async fn resume(
    path: &Path,
    run: &str,
    output: Option<std::path::PathBuf>,
    allow_changed: bool,
) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let store = open_existing_rw(path)?;
    let meta = meta_of(&store, id).await?;
    if crate::run::is_flow(&meta) && !meta.status.is_terminal() {
        drop(store);
        return crate::run::resume(path, id, &meta, output, allow_changed).await;
    }
    if crate::run::is_flow(&meta) {
        // A finished run (say, finished by `recover` or a worker) may still owe its results
        // file the items finished after its writer stopped.
        let target = output
            .clone()
            .map(|p| std::path::absolute(&p).unwrap_or(p))
            .or_else(|| meta.labels.get("output").map(std::path::PathBuf::from));
        if let Some(o) = target {
            let added = crate::run::complete_results(&store, id, &o).await?;
            println!(
                "run {id} is already {}; {added} missing result lines written to {}",
                meta.status,
                o.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    if output.is_some() || allow_changed {
        return Err(usage(format!(
            "--output and --allow-changed apply to runs of workflow files; run {id} runs `{}`",
            meta.workflow
        )));
    }
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store, Arc::clone(&progress));
    if meta.status.is_terminal() {
        println!("run {id} is already {}; nothing to resume", meta.status);
        return Ok(ExitCode::SUCCESS);
    }
    let _control = control::serve(path, engine.clone());
    let h = engine.resume(id).await?;
    println!("run {id} resumed from event {}", meta.events);
    let _ = std::io::stdout().flush();
    let show = (meta.workflow == "demo").then_some(progress);
    let outcomes = drive(&engine, vec![h], show).await?;
    Ok(report(path, &outcomes))
}

async fn recover(path: &Path) -> Result<ExitCode> {
    let store = open_existing_rw(path)?;
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store.clone(), Arc::clone(&progress));
    let _control = control::serve(path, engine.clone());
    let mut recovered = engine.recover().await?;
    // Parked runs whose timer is due are as overdue as interrupted ones.
    let due = engine.wake_due().await?;
    recovered.handles.extend(due.handles);
    recovered.failed.extend(due.failed);
    for (id, e) in &recovered.failed {
        eprintln!("run {id} cannot be resumed: {e}");
    }
    if recovered.handles.is_empty() {
        if recovered.failed.is_empty() {
            println!("no interrupted runs in {}", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        return Ok(ExitCode::FAILURE);
    }
    let mut demo = false;
    for h in &recovered.handles {
        println!("run {} recovered", h.id);
        demo |= store.run(h.id).await?.is_some_and(|m| m.workflow == "demo");
    }
    let _ = std::io::stdout().flush();
    let show = (recovered.handles.len() == 1 && demo).then_some(progress);
    let failed = !recovered.failed.is_empty();
    let outcomes = drive(&engine, recovered.handles, show).await?;
    let code = report(path, &outcomes);
    Ok(if failed { ExitCode::FAILURE } else { code })
}

/// Waits for runs to finish, showing demo progress, and turns Ctrl-C into a clean stop.
pub(crate) async fn drive(
    engine: &Engine,
    handles: Vec<RunHandle>,
    progress: Option<Arc<Progress>>,
) -> Result<Vec<Result<RunOutcome, cairn_engine::EngineError>>> {
    let started = Instant::now();
    let waits: Vec<_> = handles
        .into_iter()
        .map(|h| tokio::spawn(h.wait()))
        .collect();
    let all = async {
        let mut out = Vec::new();
        for w in waits {
            out.push(match w.await {
                Ok(r) => r,
                Err(e) => Err(cairn_engine::EngineError::Panicked {
                    run: RunId::from_u128(0),
                    detail: e.to_string(),
                }),
            });
        }
        out
    };
    tokio::pin!(all);
    let mut bar = progress.map(|p| ProgressLine::new(p, started));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stopping = false;
    // One listener for the whole wait: a listener made anew on each pass of the loop would
    // miss a SIGINT that arrives between passes (the progress tick ends a pass 10× a second).
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            out = &mut all => {
                if let Some(b) = bar.as_mut() { b.finish(); }
                return Ok(out);
            }
            _ = &mut ctrl_c, if !stopping => {
                stopping = true;
                eprintln!("\ninterrupt: stopping now; the steps in flight run again on resume (Ctrl-C again to kill)");
                engine.shutdown();
                tokio::spawn(async {
                    let _ = tokio::signal::ctrl_c().await;
                    std::process::exit(130);
                });
            }
            _ = tick.tick() => {
                if let Some(b) = bar.as_mut() { b.update(); }
            }
        }
    }
}

/// The demo's progress display: an indicatif bar on a terminal, plain lines otherwise.
struct ProgressLine {
    progress: Arc<Progress>,
    bar: Option<indicatif::ProgressBar>,
    last_plain: Instant,
    started: Instant,
}

/// An items progress bar on stderr when it is a terminal (`None` otherwise: plain lines).
pub(crate) fn items_bar() -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} items · {msg} · ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        b.set_style(style);
        b
    })
}

impl ProgressLine {
    fn new(progress: Arc<Progress>, started: Instant) -> Self {
        let bar = items_bar();
        ProgressLine {
            progress,
            bar,
            last_plain: started,
            started,
        }
    }

    fn update(&mut self) {
        let done = self.progress.items_done.load(Ordering::Relaxed);
        let total = self.progress.items_total.load(Ordering::Relaxed);
        let replayed = self.progress.items_replayed.load(Ordering::Relaxed);
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                b.set_message(format!("{replayed} answered from the log"));
            }
            None => {
                if self.last_plain.elapsed() >= Duration::from_secs(1) {
                    self.last_plain = Instant::now();
                    eprintln!(
                        "progress: {done}/{total} items ({replayed} from the log) after {:.1}s",
                        self.started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }

    fn finish(&mut self) {
        self.update();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let done = self.progress.items_done.load(Ordering::Relaxed);
        let replayed = self.progress.items_replayed.load(Ordering::Relaxed);
        eprintln!(
            "progress: {done} items in {:.1}s ({replayed} answered from the log)",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Prints each outcome and picks the exit code: 1 if any run failed, was cancelled or could
/// not run; else 130 if any was interrupted; else 0.
pub(crate) fn report(
    path: &Path,
    outcomes: &[Result<RunOutcome, cairn_engine::EngineError>],
) -> ExitCode {
    let mut failed = false;
    let mut interrupted = false;
    let store = path.display();
    for o in outcomes {
        match o {
            Ok(o) => match o.status {
                RunStatus::Completed => {
                    println!(
                        "run {} completed ({} steps executed, {} answered from the log)",
                        o.run_id, o.steps_executed, o.steps_replayed
                    );
                    if let Some(out) = &o.output {
                        println!("output: {out}");
                    }
                    println!(
                        "inspect: cairn --store {store} show {id}\nverify:  cairn --store {store} verify {id}",
                        id = o.run_id
                    );
                }
                RunStatus::Running => {
                    println!(
                        "run {} interrupted after {} steps; resume with: cairn --store {store} resume {}",
                        o.run_id, o.steps_executed, o.run_id
                    );
                    interrupted = true;
                }
                RunStatus::Waiting => {
                    println!(
                        "run {} is parked waiting (a timer, a signal or a child run); `cairn --store {store} worker` wakes it when due, `cairn --store {store} signal {} NAME` delivers a signal",
                        o.run_id, o.run_id
                    );
                }
                other => {
                    println!(
                        "run {} {other}: {}",
                        o.run_id,
                        o.error.as_deref().unwrap_or("")
                    );
                    failed = true;
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

async fn runs(path: &Path, status: Option<&str>, limit: usize, json: bool) -> Result<ExitCode> {
    let status = status
        .map(|s| s.parse::<RunStatus>())
        .transpose()
        .map_err(usage)?;
    let store = open_ro(path)?;
    let list = store
        .list_runs(RunFilter {
            status,
            limit: Some(limit),
        })
        .await?;
    if json {
        let v: Vec<serde_json::Value> = list.iter().map(meta_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no runs in {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t.set_header([
        "run", "workflow", "status", "events", "created", "updated", "parent",
    ]);
    for m in &list {
        t.add_row([
            m.id.to_string(),
            format!("{} v{}", m.workflow, m.version),
            m.status.to_string(),
            m.events.to_string(),
            fmt_ts(m.created_us),
            fmt_ts(m.updated_us),
            m.parent.map(|p| p.to_string()).unwrap_or_default(),
        ]);
    }
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

fn meta_json(m: &RunMeta) -> serde_json::Value {
    serde_json::json!({
        "run": m.id.to_string(),
        "workflow": m.workflow,
        "version": m.version,
        "status": m.status,
        "events": m.events,
        "created": fmt_ts(m.created_us),
        "updated": fmt_ts(m.updated_us),
        "parent": m.parent.map(|p| p.to_string()),
        "labels": m.labels,
    })
}

/// Reads a run's events page by page from `from` on and calls `f` on each (shared by the
/// commands that walk a history: show, events, audit, trace).
pub(crate) async fn for_each_event(
    store: &RedbStore,
    id: RunId,
    from: u64,
    mut f: impl FnMut(&cairn_storage::StoredEvent) -> Result<()>,
) -> Result<()> {
    let mut next = Seq(from);
    loop {
        let page = store.read(id, next, 4096).await?;
        let Some(last) = page.last() else { break };
        next = Seq(last.seq.0 + 1);
        for e in &page {
            f(e)?;
        }
    }
    Ok(())
}

async fn events(path: &Path, run: &str, from: u64, follow: bool) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let store = open_ro(path)?;
    meta_of(&store, id).await?;
    let mut next = from;
    let open = print_events(&store, id, &mut next).await?;
    if !follow || !open {
        return Ok(ExitCode::SUCCESS);
    }
    drop(store);
    // Following: a fresh read-only handle every 250 ms sees what the writing process (this
    // store's holder) has checkpointed; the run's status is read before its events, so the
    // events of a finished run are all printed before stopping.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let store = open_ro(path)?;
        let meta = meta_of(&store, id).await?;
        if !print_events(&store, id, &mut next).await? || meta.status.is_terminal() {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Prints a run's events from `*next` on as JSON lines and moves `*next` past them; `false`
/// once stdout is closed (`| head`: a normal way to stop reading).
async fn print_events(store: &RedbStore, id: RunId, next: &mut u64) -> Result<bool> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut open = true;
    for_each_event(store, id, *next, |e| {
        *next = e.seq.0 + 1;
        if !open {
            return Ok(());
        }
        let mut v = match Event::decode(&e.payload) {
            Ok(ev) => ev.to_json(),
            Err(err) => serde_json::json!({ "kind": "undecodable", "error": err.to_string() }),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("seq".into(), e.seq.0.into());
            o.insert("ts".into(), fmt_ts(e.ts_us).into());
            o.insert("ts_us".into(), e.ts_us.into());
            o.insert("hash".into(), hex(&e.hash).into());
        }
        match writeln!(out, "{v}") {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                open = false;
                Ok(())
            }
            r => r.map_err(Into::into),
        }
    })
    .await?;
    if let Err(e) = out.flush() {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
        open = false;
    }
    Ok(open)
}

async fn show(path: &Path, run: &str, step: Option<&str>) -> Result<ExitCode> {
    if let Some(step) = step {
        return crate::audit::show_step(path, run, step).await;
    }
    let id = parse_run(run)?;
    let store = open_ro(path)?;
    let meta = meta_of(&store, id).await?;
    let engine = Engine::new(store.clone(), cairn_engine::Registry::new());
    let state = engine.load(id).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(
        out,
        "run {id}  workflow {} v{}  status {}",
        meta.workflow, meta.version, meta.status
    )?;
    writeln!(
        out,
        "created {}  updated {}  events {}  resumes {}",
        fmt_ts(meta.created_us),
        fmt_ts(meta.updated_us),
        meta.events,
        state.resumes
    )?;
    if let Some(p) = meta.parent {
        writeln!(out, "parent {p}")?;
    }
    if let Some(source) = meta.labels.get(cairn_engine::FORKED_FROM_LABEL) {
        let point = meta.labels.get(cairn_engine::FORK_POINT_LABEL);
        let copied = meta.labels.get(cairn_engine::FORK_EVENTS_LABEL);
        writeln!(
            out,
            "forked from {source} at step {}: its first {} events are copied from that run's history, with their original times",
            point.map_or("?", String::as_str),
            copied.map_or("?", String::as_str)
        )?;
    }
    for (path, c) in &state.children {
        let status = match c.ok {
            Some(true) => "completed".to_string(),
            Some(false) => "failed or cancelled".to_string(),
            None => store
                .run(c.child)
                .await?
                .map(|m| m.status.to_string())
                .unwrap_or_else(|| "not created yet".into()),
        };
        writeln!(
            out,
            "child  {} ({}) at step {path}: {status}",
            c.child, c.workflow
        )?;
    }
    if let Some(t) = meta.wake_at_us {
        writeln!(out, "wakes  {}", fmt_ts(t))?;
    }
    writeln!(out, "input  {}", preview(&state.input.to_json(), 200))?;
    if let Some(o) = &state.output {
        writeln!(out, "output {}", preview(&o.to_json(), 200))?;
    }
    if let Some(e) = &state.error {
        writeln!(out, "error  {e}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>6}  {:<12}  {:<8}  {:<15}  detail",
        "seq", "time", "step", "event"
    )?;
    for_each_event(&store, id, 0, |e| {
        let (step, kind, detail) = match Event::decode(&e.payload) {
            Ok(ev) => describe(&ev),
            Err(err) => (String::new(), "undecodable".into(), err.to_string()),
        };
        writeln!(
            out,
            "{:>6}  {:<12}  {:<8}  {:<15}  {}",
            e.seq.0,
            fmt_time(e.ts_us),
            step,
            kind,
            detail
        )
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        Ok(())
    })
    .await?;
    let _ = out.flush();
    Ok(ExitCode::SUCCESS)
}

/// A one-line description of an event for the timeline.
fn describe(ev: &Event) -> (String, String, String) {
    let path = ev.path().map(|p| p.to_string()).unwrap_or_default();
    let detail = match ev {
        Event::RunStarted {
            workflow,
            version,
            input,
            ..
        } => format!(
            "{workflow} v{version} input {}",
            preview(&input.to_json(), 80)
        ),
        Event::RunCompleted { output } => format!("output {}", preview(&output.to_json(), 100)),
        Event::RunFailed { error } => error.clone(),
        Event::RunCancelled { reason } => reason.clone(),
        Event::RunResumed { events_before } => format!("resumed after {events_before} events"),
        Event::StepStarted { name, attempt, .. } => format!("{name} (attempt {attempt})"),
        Event::StepCompleted {
            name,
            attempt,
            started_us,
            output,
            ..
        } => {
            let _ = started_us;
            let retry = if *attempt > 1 {
                format!(" attempt {attempt}")
            } else {
                String::new()
            };
            format!("{name}{retry} → {}", preview(&output.to_json(), 80))
        }
        Event::StepFailed {
            name,
            attempt,
            error,
            retry_at_us,
            ..
        } => match retry_at_us {
            Some(t) => format!(
                "{name} attempt {attempt}: {error} (retry at {})",
                fmt_time(*t)
            ),
            None => format!("{name} attempt {attempt}: {error}"),
        },
        Event::MetadataSet { key, value, .. } => {
            format!("{key} = {}", preview(&value.to_json(), 80))
        }
        Event::FanOutStarted {
            name,
            branches,
            concurrency,
            join,
            ..
        } => format!("{name}: {branches} branches, {concurrency} at a time, join {join}"),
        Event::BranchCompleted { index, output, .. } => {
            format!("branch {index} → {}", preview(&output.to_json(), 80))
        }
        Event::BranchFailed { index, error, .. } | Event::BranchFailedWith { index, error, .. } => {
            format!("branch {index}: {error}")
        }
        Event::FanInCompleted {
            succeeded,
            failed,
            cancelled,
            error,
            ..
        } => {
            let mut d = format!("{succeeded} succeeded, {failed} failed");
            if !cancelled.is_empty() {
                d.push_str(&format!(", {} cancelled", cancelled.len()));
            }
            if let Some(e) = error {
                d.push_str(&format!(": {e}"));
            }
            d
        }
        Event::TimerSet { fire_at_us, .. } => format!("sleep until {}", fmt_ts(*fire_at_us)),
        Event::TimerFired { .. } => "woke up".to_string(),
        Event::SignalSent { name, data } => {
            format!("`{name}` delivered: {}", preview(&data.to_json(), 80))
        }
        Event::SignalWaitStarted {
            name, deadline_us, ..
        } => match deadline_us {
            Some(t) => format!("waiting for `{name}` until {}", fmt_ts(*t)),
            None => format!("waiting for `{name}`"),
        },
        Event::SignalReceived { name, sent_seq, .. } => {
            format!("received `{name}` (event {sent_seq})")
        }
        Event::SignalTimedOut { name, .. } => format!("no `{name}` before the deadline"),
        Event::ChildStarted {
            child, workflow, ..
        } => format!("child run {child} ({workflow})"),
        Event::ChildFinished {
            child,
            ok,
            output,
            error,
            ..
        } => {
            if *ok {
                format!("child {child} → {}", preview(&output.to_json(), 80))
            } else {
                format!("child {child} failed: {}", error.as_deref().unwrap_or(""))
            }
        }
        Event::RunDeadlineSet { deadline_us } => format!("must finish by {}", fmt_ts(*deadline_us)),
        Event::RunSuspended { wake_at_us, reason } => match wake_at_us {
            Some(t) => format!("parked ({reason}) until {}", fmt_ts(*t)),
            None => format!("parked ({reason})"),
        },
        _ => String::new(),
    };
    (path, ev.kind().to_string(), detail)
}

/// `replay --check`: today's built-in code against the recorded history, nothing executed.
async fn replay_check(path: &Path, run: &str) -> Result<ExitCode> {
    let id = parse_run(run)?;
    // Read-only: even a bug in the check could not write.
    let store = open_ro(path)?;
    let meta = meta_of(&store, id).await?;
    let engine = if crate::run::is_flow(&meta) {
        // A run of a workflow file is checked against the file as it is today.
        crate::run::check_engine(store, id).await?
    } else {
        engine_for(store, Arc::default())
    };
    let report = engine.check(id).await?;
    match &report.divergence {
        None => {
            println!(
                "ok {}: today's `{}` code matches the history ({} recorded operations replayed)",
                report.run_id, report.workflow, report.steps_replayed
            );
            if let Some(end) = &report.history_ends_at {
                println!("the history ends before {end}; the code would execute it next");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(d) => {
            println!("DIVERGED {}: {d}", report.run_id);
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn replay(path: &Path, run: &str) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let store = open_ro(path)?;
    meta_of(&store, id).await?;
    let engine = Engine::new(store, cairn_engine::Registry::new());
    let state = engine.load(id).await?;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(ExitCode::SUCCESS)
}

async fn verify(path: &Path, run: Option<&str>, all: bool) -> Result<ExitCode> {
    let store = open_ro(path)?;
    let ids: Vec<RunId> = match (run, all) {
        (Some(r), _) => vec![parse_run(r)?],
        (None, true) => store
            .list_runs(RunFilter::default())
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect(),
        (None, false) => return Err(usage("name a run to verify, or pass --all")),
    };
    let mut bad = 0;
    for id in ids {
        let r = store.verify(id).await?;
        match &r.problem {
            None => println!("ok {}: {} events, head {}", r.run, r.events, r.head),
            Some(p) => {
                bad += 1;
                println!("FAILED {}: {p}", r.run);
            }
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn cancel(path: &Path, run: &str, reason: &str) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let store = match open_existing_rw(path) {
        Ok(s) => s,
        Err(e) if is_locked(&e) => {
            let req = control::Request::Cancel {
                run: id.to_string(),
                reason: reason.to_string(),
            };
            return remote(path, &req, e).await;
        }
        Err(e) => return Err(e),
    };
    let engine = engine_for(store, Arc::default());
    match engine.cancel(id, reason).await? {
        CancelOutcome::AlreadyFinished(status) => {
            println!("run {id} is already {status}; nothing to cancel");
        }
        _ => println!("run {id} cancelled"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether opening the store failed because another process holds it for writing.
pub(crate) fn is_locked(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<cairn_storage::StoreError>(),
        Some(cairn_storage::StoreError::AlreadyOpen { .. })
    )
}

/// Sends a request to the process holding the store; if there is no socket to talk to,
/// reports the original lock error.
async fn remote(path: &Path, req: &control::Request, lock_err: anyhow::Error) -> Result<ExitCode> {
    match control::send(path, req).await {
        Ok(reply) if reply.ok => {
            println!("{}", reply.message.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Ok(reply) => Err(anyhow::anyhow!(reply.error.unwrap_or_default())),
        Err(_) => Err(lock_err),
    }
}

async fn signal(path: &Path, run: &str, name: &str, data: &str) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let data: serde_json::Value = serde_json::from_str(data)
        .map_err(|e| usage(format!("--data is not valid JSON ({e}): `{data}`")))?;
    let store = match open_existing_rw(path) {
        Ok(s) => s,
        Err(e) if is_locked(&e) => {
            let req = control::Request::Signal {
                run: id.to_string(),
                name: name.to_string(),
                data,
            };
            return remote(path, &req, e).await;
        }
        Err(e) => return Err(e),
    };
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store, Arc::clone(&progress));
    match engine.signal(id, name, data).await? {
        cairn_engine::SignalDelivery::Woken => {
            // The run was parked waiting: nobody else holds the store, so continue it here.
            let _control = control::serve(path, engine.clone());
            println!("signal `{name}` delivered; run {id} resumed");
            let _ = std::io::stdout().flush();
            let h = engine.resume(id).await?;
            let outcomes = drive(&engine, vec![h], None).await?;
            Ok(report(path, &outcomes))
        }
        _ => {
            println!(
                "signal `{name}` recorded for run {id}; it sees it when it waits (resume it with `cairn resume {id}` if it is interrupted)"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn review(path: &Path, run: &str, step: &str, done: bool, output: &str) -> Result<ExitCode> {
    let id = parse_run(run)?;
    let step_path: cairn_engine::StepPath = step.parse().map_err(usage)?;
    let done = if done {
        Some(
            serde_json::from_str::<serde_json::Value>(output)
                .map_err(|e| usage(format!("--output is not valid JSON ({e}): `{output}`")))?,
        )
    } else {
        None
    };
    let store = match open_existing_rw(path) {
        Ok(s) => s,
        Err(e) if is_locked(&e) => {
            let req = control::Request::Review {
                run: id.to_string(),
                step: step.to_string(),
                done,
            };
            return remote(path, &req, e).await;
        }
        Err(e) => return Err(e),
    };
    let engine = engine_for(store, Arc::default());
    let resolution = match done {
        Some(v) => cairn_engine::StepResolution::Done(v),
        None => cairn_engine::StepResolution::Retry,
    };
    engine.resolve_step(id, &step_path, resolution).await?;
    println!("step {step} of run {id} resolved; continuing the run");
    let _ = std::io::stdout().flush();
    let _control = control::serve(path, engine.clone());
    let h = engine.resume(id).await?;
    let outcomes = drive(&engine, vec![h], None).await?;
    Ok(report(path, &outcomes))
}

/// Serves the store until Ctrl-C: recovers interrupted runs, wakes parked runs on time, and
/// answers other processes' signal and cancel requests.
async fn worker(path: &Path) -> Result<ExitCode> {
    let store = open_rw(path)?;
    let engine = engine_for(store, Arc::default());
    let _control = control::serve(path, engine.clone());
    println!(
        "worker serving {} (signals and cancels: {}); Ctrl-C to stop",
        path.display(),
        control::socket_path(path).display()
    );
    let _ = std::io::stdout().flush();
    let reporter = {
        let path = path.to_path_buf();
        let store = Arc::clone(engine.store());
        move |h: RunHandle| {
            let path = path.clone();
            let store = Arc::clone(&store);
            println!("run {} started", h.id);
            let _ = std::io::stdout().flush();
            tokio::spawn(async move {
                let r = h.wait().await;
                // What the line reports is what `cairn show` in another process sees.
                let _ = store.publish().await;
                report(&path, &[r]);
                let _ = std::io::stdout().flush();
            });
        }
    };
    let serve = engine.serve_timers(reporter, |id, e| {
        eprintln!("run {id} cannot be resumed: {e}")
    });
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupt: stopping; runs in flight resume on the next start");
            engine.shutdown();
        }
    }
    engine.wait_idle().await;
    Ok(ExitCode::SUCCESS)
}
