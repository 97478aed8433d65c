//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use cairn_engine::{Engine, RunOutcome};
use cairn_storage::{EventStore, RedbStore};

/// A fresh store in a temp dir (keep the dir alive as long as the store).
pub fn store() -> (tempfile::TempDir, Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("t.redb")).unwrap();
    (dir, Arc::new(s))
}

/// Starts `workflow` with `input` and waits for its outcome.
pub async fn finish<I: serde::Serialize>(engine: &Engine, workflow: &str, input: &I) -> RunOutcome {
    engine
        .start(workflow, input)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap()
}
