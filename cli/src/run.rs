//! `cairn run FILE`: runs a workflow file over a file of items, durably, with a progress line
//! and the items' results streamed to an output file; and the resume of such a run.
//!
//! The output file is written from the run's log, not from the workers: a follower reads the
//! events recorded since its last look and appends one line per item whose outcome is
//! recorded, skipping items the file already has. So the file holds each finished item exactly
//! once, whether the process was stopped, killed or resumed any number of times, and a line is
//! only written for an outcome that is durable.

use std::collections::HashSet;
use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use cairn_agents::spec::{
    self, FLOW_PREFIX, FlowEnv, FlowFollower, FlowInput, FlowProgress, FlowSpec, ItemResult,
};
use cairn_engine::{Engine, Event, RunHandle, RunOutcome};
use cairn_storage::{EventStore, RunId, RunMeta, Seq};
use serde_json::Value;

use crate::commands::{self, open_existing_rw, open_rw, usage};
use crate::workflows;

/// Most items one run takes from an input file.
pub const ITEMS_MAX: usize = 1_000_000;

/// What `cairn run` was asked to do.
pub struct RunArgs {
    /// The workflow file.
    pub file: PathBuf,
    /// JSON lines or CSV items.
    pub input: Option<PathBuf>,
    /// Where item results go (JSON lines).
    pub output: Option<PathBuf>,
    /// `NAME=VALUE` parameters.
    pub params: Vec<String>,
    /// `KEY=VALUE` changes to the file.
    pub sets: Vec<String>,
    /// Validate only.
    pub check: bool,
}

/// Prints every issue of an invalid file and returns exit code 2.
fn invalid(e: &spec::SpecError) -> ExitCode {
    for i in &e.issues {
        eprintln!("error: {i}");
    }
    eprintln!(
        "the workflow file is invalid ({} problem{}); nothing was run or recorded",
        e.issues.len(),
        if e.issues.len() == 1 { "" } else { "s" }
    );
    ExitCode::from(2)
}

fn split_pairs(list: &[String], flag: &str) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| usage(format!("{flag} {p}: expected NAME=VALUE")))
        })
        .collect()
}

/// Reads items from JSON lines (`.jsonl`, `.ndjson`, `.json` with one value per line) or CSV
/// (`.csv`, a header row naming the fields), each with its line number.
pub fn read_items(path: &Path) -> Result<Vec<(usize, Value)>> {
    let shown = path.display();
    let file = std::fs::File::open(path)
        .map_err(|e| usage(format!("cannot read the input file {shown}: {e}")))?;
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut items = Vec::new();
    if csv {
        let mut r = csv::Reader::from_reader(file);
        let headers = r
            .headers()
            .map_err(|e| usage(format!("{shown}: cannot read the CSV header row: {e}")))?
            .clone();
        for rec in r.records() {
            let rec = rec.map_err(|e| usage(format!("{shown}: {e}")))?;
            let line = rec.position().map_or(0, |p| p.line() as usize);
            let obj: serde_json::Map<String, Value> = headers
                .iter()
                .zip(rec.iter())
                .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
                .collect();
            items.push((line, Value::Object(obj)));
            if items.len() > ITEMS_MAX {
                return Err(usage(format!(
                    "{shown}: more than {ITEMS_MAX} items; split the input"
                )));
            }
        }
    } else {
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| usage(format!("{shown}:{}: {e}", n + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| {
                usage(format!(
                    "{shown}:{}: not a JSON value ({e}); the input is JSON lines (one item per line) or a .csv file",
                    n + 1
                ))
            })?;
            items.push((n + 1, v));
            if items.len() > ITEMS_MAX {
                return Err(usage(format!(
                    "{shown}: more than {ITEMS_MAX} items; split the input"
                )));
            }
        }
    }
    Ok(items)
}

/// An engine whose registry runs workflow files with `env`.
fn engine_with(store: cairn_storage::RedbStore, env: FlowEnv) -> Engine {
    let mut registry = workflows::registry(Arc::default());
    spec::register_flows(&mut registry, env);
    Engine::with_options(Arc::new(store), registry, commands::engine_options())
}

/// `cairn run FILE …`.
pub async fn run(path: &Path, a: RunArgs) -> Result<ExitCode> {
    let env = FlowEnv::new();
    let spec = match FlowSpec::load(&a.file, &a.sets, &env) {
        Ok(s) => s,
        Err(e) => return Ok(invalid(&e)),
    };
    let params = split_pairs(&a.params, "--param")?;
    let items = match &a.input {
        Some(p) => read_items(p)?,
        None => Vec::new(),
    };
    let n_items = items.len();
    let input = spec.input(items, &params).map_err(|e| {
        usage(match &a.input {
            Some(p) => e.replace("input line", &format!("{}: line", p.display())),
            None => e,
        })
    })?;
    // With a worker serving the store, the run is forwarded and the worker checks it with its
    // own keys and tools (a client without the API keys can submit to a worker that has them).
    let served = !a.check
        && crate::control::send(path, &crate::control::Request::Ping)
            .await
            .is_ok();
    if !served {
        spec.check_runnable(&env).map_err(usage)?;
    }
    if a.check {
        println!(
            "{}: workflow `{}` is valid ({} items, {} parameters); nothing was run",
            a.file.display(),
            spec.name(),
            n_items,
            spec.params().len()
        );
        if !spec.description().is_empty() {
            println!("{}", spec.description());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let output = match &a.output {
        Some(p) => {
            if std::fs::metadata(p).is_ok_and(|m| m.len() > 0) {
                return Err(usage(format!(
                    "the output file {} already exists and is not empty; remove it or choose another --output (to continue a run, use `cairn resume RUN`)",
                    p.display()
                )));
            }
            Some(std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        }
        None => None,
    };
    let mut opts = spec.start_options(&input).map_err(usage)?;
    // The run's input is one recorded payload: check its size before creating anything.
    let limit = cairn_storage::StoreOptions::default().max_payload_bytes;
    let size = serde_json::to_vec(&opts.input).map_or(0, |v| v.len());
    if size > limit {
        return Err(usage(format!(
            "the run's input (the items and the workflow file) is {size} bytes; a run's input is limited to {limit} bytes: split the items into several runs, or keep large content in files an agent reads with a read_file tool"
        )));
    }
    if let Some(o) = &output {
        opts.labels.insert("output".into(), o.display().to_string());
    }
    let store = match open_rw(path) {
        Ok(s) => s,
        // A worker holds the store: it runs the file (its definition travels in the run's
        // input), and this process follows the run and writes the results.
        Err(e) if commands::is_locked(&e) => {
            return forward(path, opts, &spec.workflow(), n_items, output.as_deref(), e).await;
        }
        Err(e) => return Err(e),
    };
    if served {
        // The serving process went away meanwhile: this process runs it, so check here.
        spec.check_runnable(&env).map_err(usage)?;
    }
    let engine = engine_with(store, env);
    let _control = crate::control::serve(path, engine.clone());
    let h = engine.start_with(opts).await?;
    println!(
        "run {} started: {} over {n_items} items (store {})",
        h.id,
        spec.workflow(),
        path.display()
    );
    if let Some(o) = &output {
        println!("results: {}", o.display());
    }
    let _ = std::io::stdout().flush();
    follow(path, &engine, h, output.as_deref()).await
}

/// `cairn run` against a store another process holds: starts the run there through its
/// control socket, then follows it from the store (read-only, as the holder checkpoints it),
/// writing each finished item to the results file, until the run stops.
async fn forward(
    path: &Path,
    opts: cairn_engine::StartOptions,
    workflow: &str,
    n_items: usize,
    output: Option<&Path>,
    lock_err: anyhow::Error,
) -> Result<ExitCode> {
    let req = crate::control::Request::Start {
        workflow: opts.workflow.clone(),
        input: opts.input.clone(),
        timeout_secs: opts.timeout.map(|t| t.as_secs_f64()),
        labels: opts.labels.clone(),
    };
    // No socket to talk to: the store is held by a process that does not serve one.
    let Ok(reply) = crate::control::send(path, &req).await else {
        return Err(lock_err);
    };
    if !reply.ok {
        anyhow::bail!(reply.error.unwrap_or_default());
    }
    let id: RunId = reply
        .run
        .as_deref()
        .and_then(|r| r.parse().ok())
        .context("the process holding the store did not say which run it started (an older cairn?); follow it with `cairn runs`")?;
    println!(
        "run {id} started in the process holding the store: {workflow} over {n_items} items (store {})",
        path.display()
    );
    if let Some(o) = output {
        println!("results: {}", o.display());
    }
    let _ = std::io::stdout().flush();
    follow_remote(path, id, output).await
}

/// `cairn follow RUN [--output FILE]`: follows a run of a workflow file from the store,
/// read-only (another process executes it), or completes the results of a finished one.
pub async fn follow_cmd(path: &Path, run: &str, output: Option<PathBuf>) -> Result<ExitCode> {
    let id = commands::parse_run(run)?;
    let store = commands::open_ro(path)?;
    let meta = store.run(id).await?.ok_or_else(|| {
        usage(format!(
            "no run {id} in {}; list runs with `cairn runs`",
            path.display()
        ))
    })?;
    if !is_flow(&meta) {
        return Err(usage(format!(
            "run {id} runs `{}`, not a workflow file; follow runs of `cairn run`, or look at this one with `cairn show {id}`",
            meta.workflow
        )));
    }
    drop(store);
    let output = output
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .or_else(|| meta.labels.get("output").map(PathBuf::from));
    // A run left `running` with nobody serving the store would never move: say so.
    if meta.status == cairn_storage::RunStatus::Running
        && crate::control::send(path, &crate::control::Request::Ping)
            .await
            .is_err()
    {
        return Err(usage(format!(
            "run {id} is running but no process serves {}; resume it with `cairn --store {} resume {id}`",
            path.display(),
            path.display()
        )));
    }
    println!("following run {id} (store {})", path.display());
    if let Some(o) = &output {
        println!("results: {}", o.display());
    }
    let _ = std::io::stdout().flush();
    follow_remote(path, id, output.as_deref()).await
}

/// Follows a run another process executes, from the store read-only: its finished items (to
/// the results file and the progress line) until it stops; Ctrl-C stops following, not the run.
async fn follow_remote(path: &Path, id: RunId, output: Option<&Path>) -> Result<ExitCode> {
    let mut follower = FlowFollower::new(id);
    let mut out = match output {
        Some(p) => Some(OutputFile::open(p, id)?),
        None => None,
    };
    let mut bar = Bar::new();
    // The holder checkpoints every 250 ms; a fresh read-only handle each time sees the latest.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticks = 0u64;
    let outcome = loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                if let Some(o) = out.as_mut() {
                    o.finish()?;
                }
                eprintln!(
                    "\ninterrupt: stopped following; run {id} goes on in the process holding {} (follow it again: cairn --store {} follow {id})",
                    path.display(),
                    path.display()
                );
                return Ok(ExitCode::from(130));
            }
            _ = tick.tick() => {
                let store = commands::open_ro(path)?;
                let new = follower.poll(&store).await?;
                if let Some(o) = out.as_mut() {
                    o.write(&new)?;
                }
                bar.update(follower.progress());
                let Some(meta) = store.run(id).await? else { continue };
                ticks += 1;
                // Every 5 s: a running run whose executing process is gone (killed, say) would
                // never move; stop following and say how to continue it.
                if meta.status == cairn_storage::RunStatus::Running
                    && ticks.is_multiple_of(20)
                    && crate::control::send(path, &crate::control::Request::Ping).await.is_err()
                {
                    let new = follower.poll(&store).await?;
                    if let Some(o) = out.as_mut() {
                        o.write(&new)?;
                    }
                    eprintln!("\nno process serves {} any more; run {id} stopped where it was", path.display());
                    break Ok(RunOutcome {
                        run_id: id.to_string(),
                        status: meta.status,
                        output: None,
                        error: None,
                        steps_replayed: 0,
                        steps_executed: 0,
                    });
                }
                if meta.status.is_terminal() || meta.status == cairn_storage::RunStatus::Waiting {
                    // The run's last events are in the same checkpoint as its status.
                    let new = follower.poll(&store).await?;
                    if let Some(o) = out.as_mut() {
                        o.write(&new)?;
                    }
                    let engine = Engine::with_store(Arc::new(store), workflows::registry(Arc::default()));
                    break engine.wait_for(id).await;
                }
            }
        }
    };
    if let Some(o) = out.as_mut() {
        o.finish()?;
    }
    bar.finish(follower.progress());
    summarize(&follower, out.as_ref(), output);
    Ok(commands::report(path, &[outcome]))
}

/// The recorded input of a run of a workflow file.
async fn recorded_input(store: &cairn_storage::RedbStore, id: RunId) -> Result<FlowInput> {
    let first = store.read(id, Seq(0), 1).await?;
    match first.first().map(|e| Event::decode(&e.payload)) {
        Some(Ok(Event::RunStarted { input, .. })) => input
            .to_typed()
            .context("the run's recorded input is not a workflow file run's"),
        _ => anyhow::bail!("run {id} has no readable start event"),
    }
}

/// An engine for `cairn replay RUN --check` on a run of a workflow file: it runs the file as
/// it is now at the run's recorded path (with the run's `--set` changes), or the recorded copy
/// if the file is gone.
pub async fn check_engine(store: cairn_storage::RedbStore, id: RunId) -> Result<Engine> {
    let input = recorded_input(&store, id).await?;
    let env = FlowEnv::for_checking();
    let file = PathBuf::from(&input.file);
    if file.exists() {
        let spec = match FlowSpec::load(&file, &input.overrides, &env) {
            Ok(s) => s,
            Err(e) => {
                for i in &e.issues {
                    eprintln!("error: {i}");
                }
                return Err(usage(format!(
                    "the workflow file {} is invalid today; fix it to check it against run {id}",
                    file.display()
                )));
            }
        };
        if spec.source_hash() != input.source_hash {
            eprintln!(
                "note: checking the changed file {} against the history",
                file.display()
            );
        }
        env.use_spec(id, spec.text().to_string());
    } else {
        eprintln!(
            "note: the workflow file {} is gone; checking the copy recorded in the run",
            file.display()
        );
    }
    Ok(engine_with(store, env))
}

/// `cairn resume RUN` for a run of a workflow file: checks the file, then continues the run
/// and its output file.
pub async fn resume(
    path: &Path,
    id: RunId,
    meta: &RunMeta,
    output: Option<PathBuf>,
    allow_changed: bool,
) -> Result<ExitCode> {
    let store = open_existing_rw(path)?;
    let input = recorded_input(&store, id).await?;
    let env = FlowEnv::new();
    let file = PathBuf::from(&input.file);
    match std::fs::read(&file) {
        Ok(bytes) => {
            let now = blake3::hash(&bytes).to_hex().to_string();
            if now != input.source_hash {
                if !allow_changed {
                    return Err(usage(format!(
                        "the workflow file {} changed since run {id} started (recorded {}…, now {}…); put the original back, or resume with --allow-changed to run the new file (steps already recorded are checked against it, so only steps not yet recorded may change)",
                        file.display(),
                        &input.source_hash[..12],
                        &now[..12]
                    )));
                }
                let spec = match FlowSpec::load(&file, &input.overrides, &env) {
                    Ok(s) => s,
                    Err(e) => return Ok(invalid(&e)),
                };
                if spec.workflow() != meta.workflow {
                    return Err(usage(format!(
                        "the changed file declares workflow `{}`, but run {id} runs `{}`",
                        spec.workflow(),
                        meta.workflow
                    )));
                }
                spec.check_runnable(&env).map_err(usage)?;
                eprintln!(
                    "note: resuming with the changed workflow file {} (--allow-changed)",
                    file.display()
                );
                env.use_spec(id, spec.text().to_string());
            }
        }
        Err(_) => eprintln!(
            "note: the workflow file {} is gone; resuming with the copy recorded in the run",
            file.display()
        ),
    }
    let output = output
        .map(|p| std::path::absolute(&p).unwrap_or(p))
        .or_else(|| meta.labels.get("output").map(PathBuf::from));
    let engine = engine_with(store, env);
    let _control = crate::control::serve(path, engine.clone());
    let h = engine.resume(id).await?;
    println!("run {id} resumed from event {}", meta.events);
    if let Some(o) = &output {
        println!("results: {}", o.display());
    }
    let _ = std::io::stdout().flush();
    follow(path, &engine, h, output.as_deref()).await
}

/// Writes to `output` the results of run `id` that the file lacks (a finished run whose
/// writer stopped early); returns how many lines were added.
pub async fn complete_results(
    store: &cairn_storage::RedbStore,
    id: RunId,
    output: &Path,
) -> Result<usize> {
    let mut out = OutputFile::open(output, id)?;
    let before = out.lines();
    let mut follower = FlowFollower::new(id);
    let results = follower.poll(store).await?;
    out.write(&results)?;
    out.finish()?;
    Ok(out.lines() - before)
}

/// Whether a run is a run of a workflow file.
pub fn is_flow(meta: &RunMeta) -> bool {
    meta.workflow.starts_with(FLOW_PREFIX)
}

/// Waits for the run, keeping the output file and the progress line current; Ctrl-C stops the
/// run cleanly (it stays resumable).
async fn follow(
    path: &Path,
    engine: &Engine,
    h: RunHandle,
    output: Option<&Path>,
) -> Result<ExitCode> {
    let id = h.id;
    let store = Arc::clone(engine.store());
    let mut follower = FlowFollower::new(id);
    let mut out = match output {
        Some(p) => Some(OutputFile::open(p, id)?),
        None => None,
    };
    let mut bar = Bar::new();
    let wait = tokio::spawn(h.wait());
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut stopping = false;
    let outcome: Result<RunOutcome, cairn_engine::EngineError> = loop {
        tokio::select! {
            r = &mut wait => {
                break r.unwrap_or_else(|e| Err(cairn_engine::EngineError::Panicked { run: id, detail: e.to_string() }));
            }
            _ = &mut ctrl_c, if !stopping => {
                stopping = true;
                eprintln!("\ninterrupt: stopping; items in flight run again on resume (Ctrl-C again to kill)");
                engine.shutdown();
                tokio::spawn(async {
                    let _ = tokio::signal::ctrl_c().await;
                    std::process::exit(130);
                });
            }
            _ = tick.tick() => {
                let new = follower.poll(store.as_ref()).await?;
                if let Some(o) = out.as_mut() { o.write(&new)?; }
                bar.update(follower.progress());
            }
        }
    };
    let new = follower.poll(store.as_ref()).await?;
    if let Some(o) = out.as_mut() {
        o.write(&new)?;
        o.finish()?;
    }
    bar.finish(follower.progress());
    summarize(&follower, out.as_ref(), output);
    Ok(commands::report(path, &[outcome]))
}

/// The closing lines of a followed run: its items and spending, and its results file.
fn summarize(follower: &FlowFollower, out: Option<&OutputFile>, output: Option<&Path>) {
    let p = follower.progress();
    println!(
        "items: {} of {} done ({} ok, {} failed); {} model calls, {} input + {} output tokens, ${:.4}",
        p.succeeded + p.failed,
        p.items_total,
        p.succeeded,
        p.failed,
        p.model_calls,
        p.input_tokens,
        p.output_tokens,
        p.cost_usd
    );
    if let (Some(o), Some(p)) = (out, output) {
        println!("results: {} lines in {}", o.lines(), p.display());
    }
}

/// The item results file: one JSON line per finished item, each exactly once.
struct OutputFile {
    file: std::io::BufWriter<std::fs::File>,
    written: HashSet<(String, u32)>,
    run: String,
}

impl OutputFile {
    /// Opens (or creates) `path` for run `run`, reading which items it already has. A last
    /// line cut short by a crash is removed; lines of another run are refused.
    fn open(path: &Path, run: RunId) -> Result<Self> {
        let shown = path.display();
        let run = run.to_string();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("cannot open the output file {shown}"))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text)
            .with_context(|| format!("cannot read the output file {shown}"))?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            f.set_len(complete as u64)
                .with_context(|| format!("cannot trim the cut-off last line of {shown}"))?;
            f.seek(std::io::SeekFrom::End(0))?;
        }
        let mut written = HashSet::new();
        for (n, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                usage(format!(
                    "{shown}:{}: not a result line ({e}); choose another --output",
                    n + 1
                ))
            })?;
            if v["run"].as_str() != Some(run.as_str()) {
                return Err(usage(format!(
                    "{shown}:{}: a result of run {}, not of run {run}; choose another --output",
                    n + 1,
                    v["run"].as_str().unwrap_or("?")
                )));
            }
            let step = v["step"].as_str().unwrap_or_default().to_string();
            let index = v["index"].as_u64().unwrap_or(u64::MAX) as u32;
            written.insert((step, index));
        }
        Ok(OutputFile {
            file: std::io::BufWriter::new(f),
            written,
            run,
        })
    }

    fn write(&mut self, results: &[ItemResult]) -> Result<()> {
        for r in results {
            if !self.written.insert((r.step.clone(), r.index)) {
                continue;
            }
            let mut v = serde_json::to_value(r)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("run".into(), Value::String(self.run.clone()));
            }
            serde_json::to_writer(&mut self.file, &v)?;
            self.file.write_all(b"\n")?;
        }
        self.file.flush().context("cannot write the output file")?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.file.flush()?;
        self.file
            .get_ref()
            .sync_data()
            .context("cannot sync the output file")
    }

    fn lines(&self) -> usize {
        self.written.len()
    }
}

/// The progress line: an indicatif bar on a terminal, a plain line a second otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_plain: Instant,
    first_done: Option<u64>,
}

impl Bar {
    fn new() -> Self {
        Bar {
            bar: commands::items_bar(),
            started: Instant::now(),
            last_plain: Instant::now(),
            first_done: None,
        }
    }

    fn message(p: &FlowProgress) -> String {
        format!(
            "{} failed · {} calls · {} tokens · ${:.4}",
            p.failed,
            p.model_calls,
            p.input_tokens + p.output_tokens,
            p.cost_usd
        )
    }

    fn update(&mut self, p: &FlowProgress) {
        let done = p.succeeded + p.failed;
        let first = *self.first_done.get_or_insert(done);
        match &self.bar {
            Some(b) => {
                b.set_length(p.items_total);
                b.set_position(done);
                b.set_message(Self::message(p));
            }
            None => {
                if self.last_plain.elapsed() >= Duration::from_secs(1) {
                    self.last_plain = Instant::now();
                    let secs = self.started.elapsed().as_secs_f64();
                    let rate = (done - first) as f64 / secs.max(1e-3);
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", (p.items_total - done) as f64 / rate)
                    } else {
                        "?".into()
                    };
                    eprintln!(
                        "progress: {done}/{} items · {} · ETA {eta}",
                        p.items_total,
                        Self::message(p)
                    );
                }
            }
        }
    }

    fn finish(&mut self, p: &FlowProgress) {
        if let Some(b) = &self.bar {
            b.set_position(p.succeeded + p.failed);
            b.finish_and_clear();
        }
    }
}
