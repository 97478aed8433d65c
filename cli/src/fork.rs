//! `cairn fork RUN --from PATH`: a new run that reuses RUN's recorded history before step PATH
//! and executes from there (optionally with another input), to ask "what if this step had
//! been different" without paying again for the work before it. The engine does the fork
//! (`Engine::fork_prefix`); this module parses the arguments, runs the fork to its end in this
//! process like `cairn resume`, and prints the outcome the same way.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use cairn_engine::{EngineError, ForkOptions, Interrupt, StepPath};

use crate::commands::{drive, engine_for, meta_of, open_existing_rw, parse_run, report, usage};
use crate::control;
use crate::workflows::Progress;

/// `cairn fork`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ForkArgs {
    /// The run to fork (it is only read).
    pub run: String,
    /// The step to execute from, as `cairn show RUN` prints it (e.g. `3` or `5.17.2`):
    /// everything recorded before its first event is reused, it and what follows run again.
    #[arg(long, value_name = "PATH")]
    pub from: String,
    /// The fork's input as JSON (default: the run's input).
    #[arg(long)]
    pub input: Option<String>,
    /// Change one field of the input of a workflow-file run, as KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Create the fork and stop: it stays `running` until `cairn resume`, `cairn recover` or a
    /// worker continues it.
    #[arg(long)]
    pub detach: bool,
}

/// Applies `--set KEY=VALUE` changes to the input of a run of `workflow`. Only runs of
/// workflow files have named input fields to set; a Rust workflow's input is given whole with
/// `--input`. With no changes, the input is returned as it is.
pub fn apply_sets(
    workflow: &str,
    input: serde_json::Value,
    sets: &[(String, String)],
) -> Result<serde_json::Value> {
    if sets.is_empty() {
        return Ok(input);
    }
    if !workflow.starts_with(cairn_agents::spec::FLOW_PREFIX) {
        return Err(usage(format!(
            "--set applies to runs of workflow files; `{workflow}` is a Rust workflow: use --input"
        )));
    }
    // A run of a workflow file records the text it executes: the fork executes that text with
    // the changes applied (the file on disk is not read).
    let mut flow: cairn_agents::spec::FlowInput = serde_json::from_value(input).map_err(|e| {
        anyhow::anyhow!("the run's recorded input is not a workflow file run's: {e}")
    })?;
    let changes: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
    flow.spec = cairn_agents::spec::apply_overrides(&flow.spec, &changes)
        .map_err(|e| usage(format!("--set: {e}")))?;
    let env = cairn_agents::spec::FlowEnv::new();
    let spec = cairn_agents::spec::FlowSpec::from_input(&flow, &env).map_err(|e| {
        usage(format!(
            "with the --set changes the workflow file is invalid: {}",
            e.issues
                .iter()
                .map(|i| i.message.clone())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    if spec.workflow() != workflow {
        return Err(usage(
            "--set cannot change the workflow's name (the fork runs the same workflow)",
        ));
    }
    spec.check_runnable(&env).map_err(usage)?;
    flow.overrides.extend(changes);
    Ok(serde_json::to_value(flow)?)
}

/// Splits `KEY=VALUE` arguments.
fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>> {
    sets.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(usage(format!(
                "--set takes KEY=VALUE (e.g. --set topic=rust), not `{s}`"
            ))),
        })
        .collect()
}

/// Runs `cairn fork`.
pub async fn run(path: &Path, args: ForkArgs) -> Result<ExitCode> {
    let source = parse_run(&args.run)?;
    let from: StepPath = args
        .from
        .parse()
        .map_err(|e: String| usage(format!("--from: {e}")))?;
    let input: Option<serde_json::Value> = match &args.input {
        None => None,
        Some(s) => Some(
            serde_json::from_str(s)
                .map_err(|e| usage(format!("--input is not valid JSON ({e}): `{s}`")))?,
        ),
    };
    let sets = parse_sets(&args.sets)?;
    let store = open_existing_rw(path)?;
    let meta = meta_of(&store, source).await?;
    let progress = Arc::new(Progress::default());
    let engine = engine_for(store, Arc::clone(&progress));
    let input = if sets.is_empty() {
        input
    } else {
        let base = match input {
            Some(v) => v,
            None => engine.load(source).await?.input.to_json(),
        };
        Some(apply_sets(&meta.workflow, base, &sets)?)
    };
    let mut opts = ForkOptions::new(from.clone());
    opts.input = input;
    let forked = engine.fork_prefix(source, opts).await?;
    let id = forked.id;
    println!(
        "run {id} forked from {source} at step {from} ({} events reused)",
        forked.events_copied
    );
    let store_name = path.display();
    if args.detach {
        println!("continue it with: cairn --store {store_name} resume {id}");
        return Ok(ExitCode::SUCCESS);
    }
    let _ = std::io::stdout().flush();
    let _control = control::serve(path, engine.clone());
    let h = engine.resume(id).await?;
    let show = (meta.workflow == "demo").then_some(progress);
    let outcomes = drive(&engine, vec![h], show).await?;
    // Code that departs from the copied history after the pre-check (an operation it could
    // not reach without executing) stops the fork like any run; say where the history came from.
    if let [Err(EngineError::Interrupted(i @ Interrupt::NonDeterminism { .. }))] =
        outcomes.as_slice()
    {
        eprintln!(
            "error: run {id}, a fork of {source} from step {from}, stopped: {i}; or fork {source} from an earlier step"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(report(path, &outcomes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_is_refused_for_rust_workflows_and_a_no_op_without_changes() {
        let input = serde_json::json!({"steps": 3});
        assert_eq!(apply_sets("steps", input.clone(), &[]).unwrap(), input);
        let err = apply_sets("steps", input, &[("steps".into(), "4".into())]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--set applies to runs of workflow files; `steps` is a Rust workflow: use --input"
        );
    }

    #[test]
    fn sets_are_split_at_the_first_equals_sign() {
        let sets = parse_sets(&["a=1".into(), "b=x=y".into()]).unwrap();
        assert_eq!(sets, [("a".into(), "1".into()), ("b".into(), "x=y".into())]);
        assert!(parse_sets(&["novalue".into()]).is_err());
        assert!(parse_sets(&["=1".into()]).is_err());
    }
}
