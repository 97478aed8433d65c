//! The control socket: a process that holds a store for writing (`worker`, `demo`, `resume`,
//! …) listens on `<store>.sock` so that other `cairn` processes can start, signal or cancel
//! runs there (`cairn run` and `cairn start` forward their runs to it), which they could not do
//! through the store itself (one writer at a time).
//!
//! The protocol is one JSON object per line each way: a request
//! `{"op":"signal","run":ID,"name":NAME,"data":JSON}`, `{"op":"cancel","run":ID,"reason":TEXT}`
//! or `{"op":"start","workflow":NAME,"input":JSON,"labels":{…}}`, and a reply
//! `{"ok":true,"message":TEXT}` (with `"run":ID` for a start) or `{"ok":false,"error":TEXT}`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cairn_engine::{CancelOutcome, Engine, SignalDelivery};
use cairn_storage::RunId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The largest request line accepted, in bytes: a forwarded `cairn run` carries its items and
/// its workflow file, up to a run input's limit (the store's payload limit, 16 MiB by
/// default), JSON-escaped.
const REQUEST_BYTES_MAX: usize = 40 * 1024 * 1024;

/// A request to the process holding the store.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Deliver a signal to a run.
    Signal {
        /// The run id.
        run: String,
        /// The signal's name.
        name: String,
        /// Its data.
        data: serde_json::Value,
    },
    /// Start a run of a workflow in the process holding the store.
    Start {
        /// The workflow name.
        workflow: String,
        /// Its input.
        input: serde_json::Value,
        /// A per-run timeout in seconds.
        #[serde(default)]
        timeout_secs: Option<f64>,
        /// The run's labels (a forwarded `cairn run` passes its results file as `output`).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// Resolve a step that needs review.
    Review {
        /// The run id.
        run: String,
        /// The step's position.
        step: String,
        /// `Some(output)` for done, `None` for retry.
        done: Option<serde_json::Value>,
    },
    /// Whether a process serves the store (the reply says which store).
    Ping,
    /// Cancel a run.
    Cancel {
        /// The run id.
        run: String,
        /// Why.
        reason: String,
    },
}

/// The reply to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// What happened, when ok.
    #[serde(default)]
    pub message: Option<String>,
    /// What went wrong, when not ok.
    #[serde(default)]
    pub error: Option<String>,
    /// The run a `start` started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// The socket path for a store.
pub fn socket_path(store: &Path) -> PathBuf {
    let mut s = store.as_os_str().to_owned();
    s.push(".sock");
    PathBuf::from(s)
}

/// Serves the control socket until dropped; removes the socket file when dropped.
pub struct Server {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts serving `engine` on the store's socket. A failure to listen is reported and
/// tolerated: the process still works, only remote signal/cancel do not.
pub fn serve(store: &Path, engine: Engine) -> Option<Server> {
    let path = socket_path(store);
    // We hold the store's write lock, so a socket file left here belongs to a dead process.
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "warning: cannot listen on {} ({e}); remote signal/cancel are off",
                path.display()
            );
            return None;
        }
    };
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = handle(stream, engine).await;
            });
        }
    });
    Some(Server { path, task })
}

async fn handle(stream: UnixStream, engine: Engine) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(REQUEST_BYTES_MAX as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => execute(&engine, req).await,
            Err(e) => Reply {
                ok: false,
                message: None,
                error: Some(format!("bad request: {e}")),
                run: None,
            },
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

async fn execute(engine: &Engine, req: Request) -> Reply {
    let mut started = None;
    let result: Result<String> = async {
        match req {
            Request::Signal { run, name, data } => {
                let id: RunId = run.parse()?;
                Ok(match engine.signal(id, &name, data).await? {
                    SignalDelivery::Notified => format!("signal `{name}` delivered to run {id}"),
                    SignalDelivery::Woken => {
                        // Parked: resume it here, where the store is held.
                        match engine.resume(id).await {
                            Ok(h) => {
                                announce(h);
                                format!("signal `{name}` delivered; run {id} resumed")
                            }
                            Err(e) => {
                                format!("signal `{name}` recorded; run {id} not resumed: {e}")
                            }
                        }
                    }
                    _ => format!("signal `{name}` recorded for run {id}; it sees it when it waits"),
                })
            }
            Request::Start {
                workflow,
                input,
                timeout_secs,
                labels,
            } => {
                if workflow.starts_with(cairn_agents::spec::FLOW_PREFIX) {
                    check_flow(&input)?;
                }
                let mut opts = cairn_engine::StartOptions::new(&workflow, input);
                opts.timeout = timeout_secs.map(std::time::Duration::from_secs_f64);
                opts.labels = labels;
                let h = engine.start_with(opts).await?;
                let id = h.id;
                started = Some(id.to_string());
                // The serving process reports how it ends.
                announce(h);
                Ok(format!(
                    "run {id} started: {workflow} (in the process holding the store)"
                ))
            }
            Request::Review { run, step, done } => {
                let id: RunId = run.parse()?;
                let path: cairn_engine::StepPath = step.parse().map_err(anyhow::Error::msg)?;
                let resolution = match done {
                    Some(v) => cairn_engine::StepResolution::Done(v),
                    None => cairn_engine::StepResolution::Retry,
                };
                engine.resolve_step(id, &path, resolution).await?;
                let h = engine.resume(id).await?;
                announce(h);
                Ok(format!(
                    "step {step} of run {id} resolved; the run continues"
                ))
            }
            Request::Ping => Ok("serving the store".to_string()),
            Request::Cancel { run, reason } => {
                let id: RunId = run.parse()?;
                Ok(match engine.cancel(id, &reason).await? {
                    CancelOutcome::AlreadyFinished(s) => {
                        format!("run {id} is already {s}; nothing to cancel")
                    }
                    _ => format!("run {id} cancelled"),
                })
            }
        }
    }
    .await;
    match result {
        Ok(m) => Reply {
            ok: true,
            message: Some(m),
            error: None,
            run: started,
        },
        Err(e) => Reply {
            ok: false,
            message: None,
            error: Some(format!("{e:#}")),
            run: None,
        },
    }
}

/// A workflow file's run forwarded here (`cairn run`) must be runnable here, with this
/// process's models, tools and API keys: checked before the run is created, so that a run this
/// process cannot execute is refused rather than left `running`.
fn check_flow(input: &serde_json::Value) -> Result<()> {
    use cairn_agents::spec::{FlowEnv, FlowInput, FlowSpec};
    let fi: FlowInput = serde_json::from_value(input.clone())
        .context("the input of a workflow file's run is malformed")?;
    let env = FlowEnv::new();
    let spec = FlowSpec::from_input(&fi, &env).map_err(|e| {
        anyhow::anyhow!("the workflow file does not validate in the process holding the store: {e}")
    })?;
    spec.check_runnable(&env).map_err(|e| {
        anyhow::anyhow!("the process holding the store cannot run this workflow file: {e}")
    })
}

/// Prints one line when a run started through the socket stops, so the serving process's
/// output tells what happened to it.
fn announce(h: cairn_engine::RunHandle) {
    tokio::spawn(async move {
        let id = h.id;
        match h.wait().await {
            Ok(o) => match &o.error {
                Some(e) => println!("run {id} {}: {e}", o.status),
                None => println!("run {id} {}", o.status),
            },
            Err(e) => println!("run {id} stopped: {e}"),
        }
    });
}

/// Sends one request to the process holding `store` and returns its reply.
pub async fn send(store: &Path, req: &Request) -> Result<Reply> {
    let path = socket_path(store);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the process holding the store at {}",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let reply = lines
        .next_line()
        .await?
        .context("the process holding the store closed the connection")?;
    Ok(serde_json::from_str(&reply)?)
}
