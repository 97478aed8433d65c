//! A model that answers from a script instead of the network: for offline runs, demos and
//! deterministic tests.
//!
//! Answers are chosen from the request, never from a counter, so a resumed run (which answers
//! recorded calls from the log and asks only for the rest) gets the right answer: by turn (the
//! number of assistant messages already in the conversation), by the request's content hash
//! (answers recorded from an earlier run), or by a function of the request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_engine::Event;
use cairn_storage::{BoxFuture, EventStore, RunId, Seq};
use serde::Deserialize;

use crate::agent::ModelCall;
use crate::model::{Model, ModelError, ModelErrorKind, ModelRequest, ModelResponse, Role};

type Answer = dyn Fn(&ModelRequest) -> Result<ModelResponse, ModelError> + Send + Sync;

/// A scripted model; see the module documentation.
pub struct ScriptedModel {
    answer: Arc<Answer>,
    calls: AtomicU64,
}

/// One line of a keyed script: the answer to the request with this hash.
#[derive(Deserialize)]
struct Keyed {
    request_hash: String,
    response: ModelResponse,
}

impl ScriptedModel {
    /// Answers with `f(request)`.
    pub fn from_fn(
        f: impl Fn(&ModelRequest) -> Result<ModelResponse, ModelError> + Send + Sync + 'static,
    ) -> Self {
        ScriptedModel {
            answer: Arc::new(f),
            calls: AtomicU64::new(0),
        }
    }

    /// Answers turn `k` of a conversation (k = assistant messages already in it) with
    /// `responses[k]`.
    pub fn by_turn(responses: Vec<ModelResponse>) -> Self {
        Self::from_fn(move |req| {
            let turn = req
                .messages
                .iter()
                .filter(|m| m.role == Role::Assistant)
                .count();
            responses.get(turn).cloned().ok_or_else(|| {
                ModelError::new(
                    ModelErrorKind::BadRequest,
                    format!(
                        "the script has {} turns; turn {} was asked for",
                        responses.len(),
                        turn + 1
                    ),
                )
            })
        })
    }

    /// Answers by request hash (a recorded run's calls, see [`ModelRequest::hash`]).
    pub fn by_hash(answers: HashMap<String, ModelResponse>) -> Self {
        Self::from_fn(move |req| {
            let h = req.hash();
            answers.get(&h).cloned().ok_or_else(|| {
                ModelError::new(
                    ModelErrorKind::BadRequest,
                    format!("no recorded answer for request {h} (the conversation differs from the recording)"),
                )
            })
        })
    }

    /// Reads a JSON-lines script: lines `{"request_hash": …, "response": …}` answer by hash;
    /// otherwise each line is a response, answered by turn.
    pub fn from_jsonl(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ModelError::new(
                ModelErrorKind::BadRequest,
                format!("cannot read the script {}: {e}", path.display()),
            )
        })?;
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .collect();
        let bad = |n: usize, e: serde_json::Error| {
            ModelError::new(
                ModelErrorKind::BadRequest,
                format!("{}:{}: not a scripted response: {e}", path.display(), n + 1),
            )
        };
        let keyed = lines
            .first()
            .is_some_and(|(_, l)| l.contains("\"request_hash\""));
        if keyed {
            let mut map = HashMap::new();
            for (n, l) in lines {
                let k: Keyed = serde_json::from_str(l).map_err(|e| bad(n, e))?;
                map.insert(k.request_hash, k.response);
            }
            Ok(Self::by_hash(map))
        } else {
            let responses = lines
                .into_iter()
                .map(|(n, l)| serde_json::from_str(l).map_err(|e| bad(n, e)))
                .collect::<Result<Vec<ModelResponse>, _>>()?;
            Ok(Self::by_turn(responses))
        }
    }

    /// Answers with the model calls recorded in run `run` of `store`, by request hash: re-running
    /// the same workflow on the same input gets the same answers, offline and without paying.
    pub async fn from_run(store: &dyn EventStore, run: RunId) -> Result<Self, ModelError> {
        let failed = |detail: String| ModelError::new(ModelErrorKind::BadRequest, detail);
        let mut answers = HashMap::new();
        let mut from = Seq(0);
        loop {
            let page = store
                .read(run, from, 4096)
                .await
                .map_err(|e| failed(format!("cannot read run {run}: {e}")))?;
            let Some(last) = page.last() else { break };
            from = Seq(last.seq.0 + 1);
            for ev in &page {
                if let Ok(Event::StepCompleted { name, output, .. }) = Event::decode(&ev.payload)
                    && name == "model"
                    && let Ok(call) = output.to_typed::<ModelCall>()
                {
                    answers.insert(call.request_hash, call.response);
                }
            }
        }
        if answers.is_empty() {
            return Err(failed(format!("run {run} has no recorded model calls")));
        }
        Ok(Self::by_hash(answers))
    }

    /// How many calls reached this model (recorded calls answered from the log do not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Model for ScriptedModel {
    fn provider(&self) -> &str {
        "scripted"
    }

    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = (self.answer)(&req);
        Box::pin(async move { r })
    }
}

impl<M: Model + ?Sized> Model for Arc<M> {
    fn provider(&self) -> &str {
        (**self).provider()
    }

    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>> {
        (**self).call(req)
    }
}
