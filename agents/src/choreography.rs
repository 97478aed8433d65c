//! Choreography: agents (workflows) subscribe to event types; emitting an event records it and
//! starts each subscriber once, as a child run of the emitter, with no central coordinator.
//!
//! The chain is in the log: the emitter's `emit:<type>` scope holds an `event` step (type and
//! payload) and one `child_started` per subscriber; each subscriber run records its parent, and
//! may emit further events itself.

use std::collections::BTreeMap;

use cairn_engine::{StepError, WorkflowContext, WorkflowError};
use cairn_storage::RunId;
use serde::{Deserialize, Serialize};

/// The input a subscriber workflow receives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoreoEvent {
    /// The event type (e.g. `ticket.classified`).
    pub event: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// The run that emitted it.
    pub source_run: String,
}

/// Which workflows react to which event types.
#[derive(Clone, Debug, Default)]
pub struct Choreography {
    subscribers: BTreeMap<String, Vec<String>>,
}

impl Choreography {
    /// No subscriptions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `workflow` (a registered workflow taking a [`ChoreoEvent`]) react to `event`.
    pub fn subscribe(mut self, event: &str, workflow: &str) -> Self {
        self.subscribers
            .entry(event.to_string())
            .or_default()
            .push(workflow.to_string());
        self
    }

    /// The workflows subscribed to `event`.
    pub fn subscribers(&self, event: &str) -> &[String] {
        self.subscribers
            .get(event)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Records `event` with `payload` and starts each subscriber once; returns their run ids.
    pub async fn emit<T: Serialize>(
        &self,
        ctx: &WorkflowContext,
        event: &str,
        payload: &T,
    ) -> Result<Vec<RunId>, WorkflowError> {
        let payload = serde_json::to_value(payload)
            .map_err(|e| WorkflowError::msg(format!("event `{event}` cannot be encoded: {e}")))?;
        let scope = ctx.scope(&format!("emit:{event}")).await?;
        let ev = ChoreoEvent {
            event: event.to_string(),
            payload,
            source_run: ctx.run_id().to_string(),
        };
        let e2 = ev.clone();
        let ev: ChoreoEvent = scope
            .step("event", move || async move { Ok::<_, StepError>(e2) })
            .await?;
        let mut started = Vec::new();
        for wf in self.subscribers(event) {
            started.push(scope.start_child(wf, &ev).await?);
        }
        Ok(started)
    }
}
