//! Child runs: a workflow starts another workflow and awaits its result.
//!
//! The child's id is recorded (`child_started`) before the child run is created, so a parent
//! that crashes in between creates the same child on resume instead of an orphan twin. The
//! child is an ordinary run with its `parent` set; its result is recorded in the parent
//! (`child_finished`), so a resumed parent never waits for it again. Cancelling the parent
//! cancels the child.

use std::future::Future;

use cairn_storage::{RunId, RunStatus};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::{WorkflowContext, lock};
use crate::error::{EngineError, Interrupt, WorkflowError};
use crate::event::{Event, Payload, StepPath};
use crate::runtime::{Engine, StartOptions};
use crate::state::Kind;

impl WorkflowContext {
    /// Starts workflow `workflow` as a child run with `input` and waits for its output. A
    /// failed or cancelled child is returned as [`WorkflowError::Step`].
    pub fn child<I, O>(
        &self,
        workflow: &str,
        input: &I,
    ) -> impl Future<Output = Result<O, WorkflowError>> + Send + use<'_, I, O>
    where
        I: Serialize,
        O: DeserializeOwned + Send + 'static,
    {
        let path = self.next_path();
        let workflow = workflow.to_string();
        let input = serde_json::to_value(input).map_err(|e| {
            WorkflowError::msg(format!(
                "the input of child `{workflow}` cannot be encoded: {e}"
            ))
        });
        async move { self.run_child(path, workflow, input?).await }
    }

    /// Starts workflow `workflow` as a child run with `input` without waiting for it (a
    /// detached child, e.g. a subscriber reacting to an event). Its id is recorded first, so
    /// the child is created exactly once, even if this run is resumed; returns its id.
    pub fn start_child<I: Serialize>(
        &self,
        workflow: &str,
        input: &I,
    ) -> impl Future<Output = Result<RunId, WorkflowError>> + Send + use<'_, I> {
        let path = self.next_path();
        let workflow = workflow.to_string();
        let input = serde_json::to_value(input).map_err(|e| {
            WorkflowError::msg(format!(
                "the input of child `{workflow}` cannot be encoded: {e}"
            ))
        });
        async move {
            let input = input?;
            let (child, _) = self.ensure_child(path, &workflow, input).await?;
            Ok(child)
        }
    }

    /// Records (or finds recorded) the child at `path` and makes sure the run exists. Returns
    /// its id and, if the parent already recorded how it finished, that record.
    async fn ensure_child(
        &self,
        path: StepPath,
        workflow: &str,
        input: serde_json::Value,
    ) -> Result<(RunId, Option<crate::state::ChildRecord>), WorkflowError> {
        let shared = &self.shared;
        shared.check()?;
        let recorded = {
            let st = lock(&shared.state);
            if let Some(other) = st.run.other_kind_at(&path, Kind::Child) {
                drop(st);
                return Err(self.nondeterminism(path, other, format!("child run of `{workflow}`")));
            }
            match st.run.children.get(&path) {
                Some(c) if c.workflow != workflow => {
                    let recorded = format!("child run of `{}`", c.workflow);
                    drop(st);
                    return Err(self.nondeterminism(
                        path,
                        recorded,
                        format!("child run of `{workflow}`"),
                    ));
                }
                Some(c) => Some(c.clone()),
                None => None,
            }
        };
        let child = match &recorded {
            Some(c) if c.ok.is_some() => return Ok((c.child, recorded)),
            Some(c) => c.child,
            None => {
                let child = RunId::new();
                shared
                    .record(Event::ChildStarted {
                        path: path.clone(),
                        child,
                        workflow: workflow.to_string(),
                    })
                    .await?;
                child
            }
        };
        if shared.check_only {
            // Started but not finished: the code would create or wait for the child.
            return Err(shared.end_of_history(&path, &format!("child run of `{workflow}`")));
        }
        let Some(inner) = shared.engine.upgrade() else {
            return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
        };
        let engine = Engine::from_inner(inner);
        let exists = shared.store.run(child).await.map_err(|e| {
            shared.set_interrupt(Interrupt::Store {
                run: shared.run_id,
                detail: format!("child run {child}: {e}"),
            })
        })?;
        if exists.is_none() {
            let mut opts = StartOptions::new(workflow, input);
            opts.parent = Some(shared.run_id);
            opts.id = Some(child);
            if let Err(e) = engine.start_with(opts).await {
                let message = e.to_string();
                if matches!(
                    e,
                    EngineError::BadInput { .. } | EngineError::UnknownWorkflow { .. }
                ) {
                    return Err(WorkflowError::Step {
                        path,
                        name: format!("child {workflow}"),
                        message,
                    });
                }
                return Err(shared.set_interrupt(Interrupt::Store {
                    run: shared.run_id,
                    detail: format!("child run {child}: {message}"),
                }));
            }
        }
        Ok((child, recorded))
    }

    async fn run_child<O: DeserializeOwned>(
        &self,
        path: StepPath,
        workflow: String,
        input: serde_json::Value,
    ) -> Result<O, WorkflowError> {
        let shared = &self.shared;
        let child = match self.ensure_child(path.clone(), &workflow, input).await {
            Ok((_, Some(c))) if c.ok.is_some() => {
                return self.child_result(&path, &workflow, c.ok == Some(true), c.output, c.error);
            }
            Ok((child, _)) => child,
            // The child could not be created (unknown workflow, bad input): record that as its
            // outcome, so a resumed parent does not try again.
            Err(WorkflowError::Step { message, .. }) => {
                let child = lock(&shared.state).run.children.get(&path).map(|c| c.child);
                if let Some(child) = child {
                    shared
                        .record(Event::ChildFinished {
                            path: path.clone(),
                            child,
                            ok: false,
                            output: Payload::default(),
                            error: Some(message.clone()),
                        })
                        .await?;
                }
                return Err(WorkflowError::Step {
                    path,
                    name: format!("child {workflow}"),
                    message,
                });
            }
            Err(e) => return Err(e),
        };
        let Some(inner) = shared.engine.upgrade() else {
            return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
        };
        let engine = Engine::from_inner(inner);
        let store_err = |e: EngineError| {
            shared.set_interrupt(Interrupt::Store {
                run: shared.run_id,
                detail: format!("child run {child}: {e}"),
            })
        };
        let finished = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                let _ = engine.cancel(child, "its parent was cancelled").await;
                return Err(shared.set_interrupt(Interrupt::Cancelled(shared.run_id)));
            }
            _ = shared.shutdown.cancelled() => {
                return Err(shared.set_interrupt(Interrupt::Shutdown(shared.run_id)));
            }
            r = engine.wait_for(child) => r.map_err(store_err)?,
        };
        let (ok, output, error) = match finished.status {
            RunStatus::Completed => (
                true,
                Payload::from_value(&finished.output.unwrap_or_default()).unwrap_or_default(),
                None,
            ),
            RunStatus::Running | RunStatus::Pending | RunStatus::Waiting => {
                // The child stopped without finishing (shutdown, or parked waiting): the parent
                // waits too and picks it up again on resume.
                return Err(shared.set_interrupt(Interrupt::Suspend {
                    run: shared.run_id,
                    wake_at_us: None,
                    reason: format!("waiting for child run {child}"),
                }));
            }
            other => (
                false,
                Payload::default(),
                Some(format!(
                    "child run {child} {other}: {}",
                    finished.error.unwrap_or_default()
                )),
            ),
        };
        shared
            .record(Event::ChildFinished {
                path: path.clone(),
                child,
                ok,
                output: output.clone(),
                error: error.clone(),
            })
            .await?;
        self.child_result(&path, &workflow, ok, Some(output), error)
    }

    fn child_result<O: DeserializeOwned>(
        &self,
        path: &StepPath,
        workflow: &str,
        ok: bool,
        output: Option<Payload>,
        error: Option<String>,
    ) -> Result<O, WorkflowError> {
        if !ok {
            return Err(WorkflowError::Step {
                path: path.clone(),
                name: format!("child {workflow}"),
                message: error.unwrap_or_default(),
            });
        }
        let output = output.unwrap_or_default();
        let decoded = if output.is_empty() {
            serde_json::from_str("null")
        } else {
            output.to_typed()
        };
        decoded.map_err(|e| {
            self.shared.set_interrupt(Interrupt::RecordedTypeChanged {
                run: self.shared.run_id,
                path: path.clone(),
                name: format!("child {workflow}"),
                detail: e.to_string(),
            })
        })
    }
}
