//! Workflow files end to end: validation (every error class, with its exact line and a message
//! that says how to fix it), `--set` overrides, run inputs, and the interpreter on a real redb
//! store with scripted models (router, handoffs, fallbacks, `min_required`, Rust tools, the
//! follower of item results, resume without repeating model calls, a missing API key).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agents::spec::{
    FlowEnv, FlowFollower, FlowInput, FlowSpec, ItemResult, SpecIssue, apply_overrides,
    register_flows,
};
use cairn_agents::{
    Block, Model, ModelCall, ModelError, ModelErrorKind, ModelRequest, ModelResponse, Role,
    ScriptedModel, StopReason, ToolError, Usage, tool,
};
use cairn_engine::{Engine, EngineError, Event, Interrupt, Registry, RunOutcome};
use cairn_storage::{BoxFuture, EventStore, RedbStore, RunId, RunStatus, Seq};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A minimal valid file; tests append to it or replace parts of it.
const BASE: &str = r#"[workflow]
name = "t"

[models.m]
provider = "recorded"
model = "x"
responses = "r.jsonl"

[agents.a]
model = "m"
"#;

const ONE_STEP: &str = r#"
[[flow]]
id = "one"
agent = "a"
prompt = "hi"
"#;

/// Writes `text` as `wf.toml` in a fresh folder.
fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wf.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn load_env(text: &str, env: &FlowEnv) -> Result<FlowSpec, Vec<SpecIssue>> {
    let (_d, path) = file(text);
    FlowSpec::load(&path, &[], env).map_err(|e| e.issues)
}

/// The issues of an invalid file (panics if it is valid).
fn issues(text: &str) -> Vec<SpecIssue> {
    match load_env(text, &FlowEnv::new()) {
        Ok(_) => panic!("the file should be invalid:\n{text}"),
        Err(i) => i,
    }
}

/// The only issue of an invalid file.
fn issue(text: &str) -> SpecIssue {
    let list = issues(text);
    assert_eq!(list.len(), 1, "expected one issue, got {list:#?}");
    list.into_iter().next().unwrap()
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` is not in the text"))
        + 1
}

/// Asserts `i` is on the line containing `needle` and its message contains every part.
#[track_caller]
fn assert_issue(i: &SpecIssue, text: &str, needle: &str, parts: &[&str]) {
    assert_eq!(
        i.line,
        line_of(text, needle),
        "wrong line for {i}\n(expected the line with `{needle}`)"
    );
    for p in parts {
        assert!(i.message.contains(p), "message `{}` lacks `{p}`", i.message);
    }
}

fn usage(i: u64, o: u64) -> Usage {
    Usage {
        input_tokens: i,
        output_tokens: o,
        ..Usage::default()
    }
}

fn say(text: &str) -> ModelResponse {
    ModelResponse {
        id: String::new(),
        model: "scripted".into(),
        content: vec![Block::Text { text: text.into() }],
        stop_reason: StopReason::EndTurn,
        usage: usage(100, 20),
    }
}

/// The text of the last user message of a request.
fn last_user(req: &ModelRequest) -> String {
    req.messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.text())
        .unwrap_or_default()
}

fn store() -> (tempfile::TempDir, Arc<dyn EventStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(dir.path().join("t.redb")).unwrap();
    (dir, Arc::new(s))
}

fn engine(store: &Arc<dyn EventStore>, env: FlowEnv) -> Engine {
    let mut reg = Registry::new();
    register_flows(&mut reg, env);
    Engine::with_store(Arc::clone(store), reg)
}

/// Items as `cairn run` reads them from JSON lines (line n+1 for item n).
fn lines(items: &[Value]) -> Vec<(usize, Value)> {
    items
        .iter()
        .enumerate()
        .map(|(n, v)| (n + 1, v.clone()))
        .collect()
}

/// Starts a run of `spec` with `items` and waits for its outcome.
async fn run_to_end(
    store: &Arc<dyn EventStore>,
    env: FlowEnv,
    spec: &FlowSpec,
    items: &[Value],
) -> RunOutcome {
    let input = spec.input(lines(items), &[]).unwrap();
    let e = engine(store, env);
    e.start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap()
}

/// A run's events, decoded, in log order.
async fn run_events(store: &Arc<dyn EventStore>, id: RunId) -> Vec<Event> {
    store
        .read(id, Seq(0), 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap())
        .collect()
}

/// The details the failed branches of a run left (`branch_failed` with details), in log order.
async fn failure_details(store: &Arc<dyn EventStore>, id: RunId) -> Vec<Value> {
    run_events(store, id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::BranchFailedWith { details, .. } => Some(details.to_json()),
            _ => None,
        })
        .collect()
}

/// The outputs of the steps named `name` in a run's log, in log order.
async fn step_outputs(store: &Arc<dyn EventStore>, id: RunId, name: &str) -> Vec<Value> {
    run_events(store, id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::StepCompleted {
                name: n, output, ..
            } if n == name => Some(output.to_json()),
            _ => None,
        })
        .collect()
}

/// All item results of a run, read by a fresh follower.
async fn follow_all(store: &Arc<dyn EventStore>, id: RunId) -> Vec<ItemResult> {
    let mut f = FlowFollower::new(id);
    let mut r = f.poll(store.as_ref()).await.unwrap();
    r.sort_by_key(|r| r.index);
    r
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

#[test]
fn the_base_file_is_valid() {
    let spec = load_env(&format!("{BASE}{ONE_STEP}"), &FlowEnv::new()).unwrap();
    assert_eq!(spec.name(), "t");
    assert_eq!(spec.workflow(), "file:t");
    assert!(!spec.needs_items());
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    let text = format!("{BASE}{ONE_STEP}\n[[flow]]\nid = \"two\nagent = \"a\"\n");
    let i = issue(&text);
    assert_issue(&i, &text, "id = \"two", &["invalid basic string"]);
    assert!(i.column > 0, "{i}");
}

#[test]
fn an_unknown_field_is_refused_with_the_known_ones() {
    let text = format!("{BASE}{ONE_STEP}concurency = 4\n");
    let i = issue(&text);
    assert_issue(
        &i,
        &text,
        "concurency",
        &["unknown field `concurency`", "concurrency"],
    );
    // In a model table too.
    let text = BASE.replace("model = \"x\"", "model = \"x\"\napi_key = \"sk-1\"") + ONE_STEP;
    assert_issue(
        &issue(&text),
        &text,
        "api_key =",
        &["unknown field `api_key`"],
    );
}

#[test]
fn a_file_without_a_workflow_table_says_how_to_add_it() {
    let text = BASE.replace("[workflow]\nname = \"t\"\n", "") + ONE_STEP;
    let i = issue(&text);
    assert!(
        i.message.contains("missing the [workflow] table") && i.message.contains("name = \"...\""),
        "{i}"
    );
    assert_eq!((i.line, i.column), (1, 1), "{i}");
}

#[test]
fn a_step_naming_an_unknown_agent_lists_the_declared_ones() {
    let text = format!(
        "{BASE}{}",
        ONE_STEP.replace("agent = \"a\"", "agent = \"nobody\"")
    );
    assert_issue(
        &issue(&text),
        &text,
        "agent = \"nobody\"",
        &["step `one`", "unknown agent `nobody`", "declared: a"],
    );
}

#[test]
fn an_agent_naming_an_unknown_model_says_which_table_to_add() {
    let text = BASE.replace("[agents.a]\nmodel = \"m\"", "[agents.a]\nmodel = \"big\"") + ONE_STEP;
    assert_issue(
        &issue(&text),
        &text,
        "model = \"big\"",
        &[
            "agent `a`",
            "unknown model `big`",
            "declared: m",
            "add [models.big]",
        ],
    );
}

#[test]
fn an_agent_naming_an_unknown_tool_lists_file_and_rust_tools() {
    let text = BASE.replace(
        "[agents.a]\nmodel = \"m\"",
        "[tools.kb]\nkind = \"read_file\"\nroot = \"kb\"\n\n[agents.a]\nmodel = \"m\"\ntools = [\"kb\", \"search\"]",
    ) + ONE_STEP;
    let env = FlowEnv::new().tool(tool(
        "lookup",
        "Find a ticket",
        |_: serde_json::Map<String, Value>| async { Ok::<_, ToolError>(json!({})) },
    ));
    let list = load_env(&text, &env).unwrap_err();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_issue(
        &list[0],
        &text,
        "tools = [",
        &[
            "agent `a`",
            "unknown tool `search`",
            "kb",
            "lookup",
            "[tools.search]",
            "register it from Rust",
        ],
    );
    // The column points at the unknown name, not at `kb`.
    let l = text.lines().nth(list[0].line - 1).unwrap();
    assert_eq!(list[0].column, l.find("\"search\"").unwrap() + 1);
    // With the Rust tool named, the file is valid.
    let ok = text.replace("\"search\"", "\"lookup\"");
    load_env(&ok, &env).unwrap();
}

#[test]
fn a_tool_declared_in_the_file_and_registered_from_rust_is_refused() {
    let text = BASE.replace(
        "[agents.a]",
        "[tools.lookup]\nkind = \"extract_json\"\n\n[agents.a]",
    ) + ONE_STEP;
    let env = FlowEnv::new().tool(tool(
        "lookup",
        "Find a ticket",
        |_: serde_json::Map<String, Value>| async { Ok::<_, ToolError>(json!({})) },
    ));
    let list = load_env(&text, &env).unwrap_err();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert!(
        list[0].message.contains("also registered from Rust"),
        "{}",
        list[0]
    );
}

#[test]
fn a_step_naming_an_unknown_router_lists_the_declared_ones() {
    let text = format!(
        "{BASE}
[routers.desk]
model = \"m\"

[routers.desk.routes.billing]
agent = \"a\"
description = \"money\"

[[flow]]
id = \"route\"
router = \"triage\"
prompt = \"hi\"
"
    );
    assert_issue(
        &issue(&text),
        &text,
        "router = \"triage\"",
        &["step `route`", "unknown router `triage`", "declared: desk"],
    );
}

/// A file with a for_each over items and a parameter, for template checks; `{PROMPT}` is
/// replaced by the prompt of the branch step.
const TEMPLATED: &str = r#"[workflow]
name = "t"

[params]
audience = "support lead"

[models.m]
provider = "recorded"
model = "x"
responses = "r.jsonl"

[agents.a]
model = "m"

[[flow]]
id = "intro"
agent = "a"
prompt = "Hello {{ input.audience }}"

[[flow]]
id = "each"
for_each = "items"

[[flow.steps]]
id = "look"
agent = "a"
prompt = """
Ticket {{ item.id }}
{PROMPT}
"""

[[flow.steps]]
id = "answer"
agent = "a"
prompt = "Answer after {{ steps.look.text }}"

[[flow]]
id = "report"
agent = "a"
prompt = "{{ steps.each.succeeded }} of {{ steps.each.count }}: {{ steps.each.results }}"
"#;

#[test]
fn the_templated_file_is_valid() {
    let text = TEMPLATED.replace("{PROMPT}", "{{ item.subject }} {{ steps.intro.text }}");
    let spec = load_env(&text, &FlowEnv::new()).unwrap();
    assert!(spec.needs_items());
}

#[test]
fn bad_template_variables_are_reported_on_their_line() {
    let cases: &[(&str, &[&str])] = &[
        // An unknown root.
        (
            "{{ ticket.subject }}",
            &[
                "step `look`",
                "unknown template variable `ticket`",
                "item.<field>, input.<param> or steps.<id>.<field>",
            ],
        ),
        // A parameter the file does not declare.
        (
            "{{ input.tone }}",
            &[
                "no parameter `tone`",
                "declared: audience",
                "declare it under [params]",
            ],
        ),
        // A step that runs later.
        (
            "{{ steps.answer.text }}",
            &[
                "`{{ steps.answer.text }}`",
                "no step `answer` runs before this one",
            ],
        ),
        // A step that does not exist.
        (
            "{{ steps.nope.text }}",
            &["no step `nope` runs before this one"],
        ),
        // A field an agent step does not have.
        (
            "{{ steps.intro.category }}",
            &["use one of", "steps.intro.text", "steps.intro.cost_usd"],
        ),
        // A malformed reference.
        ("{{ item..x }}", &["is not a reference"]),
    ];
    for (prompt, parts) in cases {
        let text = TEMPLATED.replace("{PROMPT}", prompt);
        let i = issue(&text);
        assert_issue(&i, &text, prompt, parts);
        // The column is the reference's own.
        let l = text.lines().nth(i.line - 1).unwrap();
        assert_eq!(i.column, l.find("{{").unwrap() + 1, "column of {i}");
    }
}

#[test]
fn a_for_each_exposes_only_its_counts_and_results() {
    let text = TEMPLATED
        .replace("{PROMPT}", "x")
        .replace("{{ steps.each.succeeded }}", "{{ steps.each.text }}");
    assert_issue(
        &issue(&text),
        &text,
        "steps.each.text",
        &[
            "step `report`",
            "steps.each.count",
            "steps.each.succeeded",
            "steps.each.failed",
            "steps.each.results",
        ],
    );
}

#[test]
fn item_outside_a_for_each_is_refused() {
    let text = TEMPLATED
        .replace("{PROMPT}", "x")
        .replace("Hello {{ input.audience }}", "Hello {{ item.name }}");
    assert_issue(
        &issue(&text),
        &text,
        "Hello {{ item.name }}",
        &[
            "step `intro`",
            "`item` exists only in the steps of a for_each",
        ],
    );
}

#[test]
fn a_branch_step_is_not_visible_after_its_for_each() {
    let text = TEMPLATED
        .replace("{PROMPT}", "x")
        .replace("{{ steps.each.results }}", "{{ steps.look.text }}");
    assert_issue(
        &issue(&text),
        &text,
        "{{ steps.each.succeeded }}",
        &["step `report`", "no step `look` runs before this one"],
    );
}

#[test]
fn a_handoff_from_itself_or_a_later_step_is_a_cycle() {
    let text = format!(
        "{BASE}
[[flow]]
id = \"first\"
agent = \"a\"
handoff = {{ from = \"first\", mode = \"full\" }}

[[flow]]
id = \"second\"
agent = \"a\"
handoff = {{ from = \"third\", mode = \"full\" }}

[[flow]]
id = \"third\"
agent = \"a\"
prompt = \"x\"
"
    );
    let list = issues(&text);
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_issue(
        &list[0],
        &text,
        "from = \"first\"",
        &[
            "step `first`",
            "cycle",
            "`first`, which does not run before it",
        ],
    );
    assert_issue(
        &list[1],
        &text,
        "from = \"third\"",
        &["step `second`", "cycle", "`third`"],
    );
    // A handoff from an unknown step is not called a cycle.
    let text = text.replace("from = \"third\"", "from = \"ghost\"");
    let list = issues(&text);
    assert!(
        list[1].message.contains("unknown step `ghost`") && !list[1].message.contains("cycle"),
        "{}",
        list[1]
    );
}

#[test]
fn bad_handoff_modes_and_models_are_reported() {
    let text = format!(
        "{BASE}{ONE_STEP}
[[flow]]
id = \"two\"
agent = \"a\"
handoff = {{ from = \"one\", mode = \"summary\" }}

[[flow]]
id = \"three\"
agent = \"a\"
handoff = {{ from = \"one\", mode = \"half\" }}
"
    );
    let list = issues(&text);
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_issue(
        &list[0],
        &text,
        "mode = \"summary\"",
        &["a summary handoff needs `model`"],
    );
    assert_issue(
        &list[1],
        &text,
        "mode = \"half\"",
        &["handoff mode `half` is neither `full` nor `summary`"],
    );
}

#[test]
fn a_duplicate_step_id_is_refused_at_the_second_use() {
    let text = format!("{BASE}{ONE_STEP}{ONE_STEP}");
    let i = issue(&text);
    // The second `id = "one"`.
    let second = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("id = \"one\""))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert_eq!(i.line, second, "{i}");
    assert!(
        i.message
            .contains("step id `one` is used twice; step ids must be unique"),
        "{i}"
    );
}

#[test]
fn a_step_must_have_exactly_one_kind() {
    let text = format!(
        "{BASE}
[routers.r]
model = \"m\"
routes.x = {{ agent = \"a\", description = \"x\" }}

[[flow]]
id = \"both\"
agent = \"a\"
router = \"r\"
prompt = \"hi\"

[[flow]]
id = \"neither\"
prompt = \"hi\"
"
    );
    let list = issues(&text);
    assert_eq!(list.len(), 2, "{list:#?}");
    for (i, id) in list.iter().zip(["both", "neither"]) {
        assert!(
            i.message.contains(&format!(
                "step `{id}` must have exactly one of `agent`, `router` or `for_each`"
            )),
            "{i}"
        );
    }
    // Each is reported at its table's `[[flow]]` header.
    assert_eq!(list[0].line, line_of(&text, "id = \"both\"") - 1);
    assert_eq!(list[1].line, line_of(&text, "id = \"neither\"") - 1);
}

#[test]
fn a_for_each_inside_a_for_each_must_run_over_an_array_in_the_item() {
    let text = format!(
        "{BASE}
[[flow]]
id = \"outer\"
for_each = \"items\"

[[flow.steps]]
id = \"inner\"
for_each = \"items\"

[[flow.steps.steps]]
id = \"leaf\"
agent = \"a\"
prompt = \"{{{{ item.x }}}}\"
"
    );
    let i = issue(&text);
    assert!(
        i.message.contains(
            "step `inner`: a for_each inside a for_each runs over an array in the item: write for_each = \"item.<field>\""
        ),
        "{i}"
    );
    // At the inner step's `for_each` value.
    assert_eq!(i.line, line_of(&text, "id = \"inner\"") + 1, "{i}");
    // Over an array in the item, it is valid.
    let ok = text.replace(
        "id = \"inner\"\nfor_each = \"items\"",
        "id = \"inner\"\nfor_each = \"item.parts\"",
    );
    assert!(load_env(&ok, &FlowEnv::new()).is_ok(), "{ok}");
    // `parent` exists only two levels down.
    let one_level = format!(
        "{BASE}
[[flow]]
id = \"outer\"
for_each = \"items\"

[[flow.steps]]
id = \"leaf\"
agent = \"a\"
prompt = \"{{{{ parent.x }}}}\"
"
    );
    let i = issue(&one_level);
    assert!(
        i.message.contains(
            "`parent` (the enclosing item) exists only in the steps of a for_each inside a for_each"
        ),
        "{i}"
    );
}

const FOR_EACH: &str = r#"
[[flow]]
id = "each"
for_each = "items"
{SETTINGS}

[[flow.steps]]
id = "look"
agent = "a"
prompt = "{{ item.x }}"
"#;

fn for_each(settings: &str) -> String {
    format!("{BASE}{}", FOR_EACH.replace("{SETTINGS}", settings))
}

#[test]
fn min_required_zero_is_refused() {
    let text = for_each("min_required = 0");
    assert_issue(
        &issue(&text),
        &text,
        "min_required = 0",
        &[
            "step `each`",
            "min_required must be at least 1",
            "leave it out to require every item",
        ],
    );
}

#[test]
fn concurrency_out_of_range_is_refused() {
    for c in ["0", "1025"] {
        let text = for_each(&format!("concurrency = {c}"));
        assert_issue(
            &issue(&text),
            &text,
            "concurrency =",
            &["step `each`", "concurrency must be 1 to 1024"],
        );
    }
    load_env(&for_each("concurrency = 1024"), &FlowEnv::new()).unwrap();
    load_env(&for_each("concurrency = 1"), &FlowEnv::new()).unwrap();
    // A negative number is not even a u32: serde says so, on its line.
    let text = for_each("concurrency = -1");
    assert_issue(
        &issue(&text),
        &text,
        "concurrency = -1",
        &["invalid value: integer `-1`, expected u32"],
    );
}

#[test]
fn a_for_each_settings_on_an_agent_step_are_refused() {
    let text = format!("{BASE}{ONE_STEP}concurrency = 4\n");
    let i = issue(&text);
    assert!(
        i.message
            .contains("step `one`: `concurrency` does not apply to agent steps"),
        "{i}"
    );
}

#[test]
fn a_recorded_model_needs_responses_unless_replaced_from_rust() {
    let text = BASE.replace("responses = \"r.jsonl\"\n", "") + ONE_STEP;
    let i = issue(&text);
    assert_issue(
        &i,
        &text,
        "[models.m]",
        &[
            "model `m`",
            "provider `recorded` needs `responses = \"FILE.jsonl\"`",
        ],
    );
    // A program that replaces the model does not need the file.
    let env = FlowEnv::new().model("m", Arc::new(ScriptedModel::by_turn(vec![])));
    load_env(&text, &env).unwrap();
}

#[test]
fn an_unknown_provider_is_refused() {
    let text = BASE.replace("provider = \"recorded\"", "provider = \"mistral\"") + ONE_STEP;
    // The agent's model is then unknown too: both are reported.
    let list = issues(&text);
    assert_issue(
        &list[0],
        &text,
        "provider = \"mistral\"",
        &[
            "unknown provider `mistral`",
            "anthropic, openai or recorded",
        ],
    );
}

#[test]
fn several_problems_are_all_reported_in_file_order() {
    let text = format!(
        "{BASE}
[agents.b]
model = \"nope\"
max_turns = 0

[[flow]]
id = \"one\"
agent = \"ghost\"
prompt = \"{{{{ input.missing }}}}\"

[[flow]]
id = \"one\"
agent = \"a\"
prompt = \"{{{{ steps.later.text }}}}\"
"
    );
    let list = issues(&text);
    let got: Vec<(usize, &str)> = list.iter().map(|i| (i.line, i.message.as_str())).collect();
    assert_eq!(list.len(), 6, "{got:#?}");
    let expect = [
        ("model = \"nope\"", "unknown model `nope`"),
        ("max_turns = 0", "max_turns must be 1 to 100"),
        ("agent = \"ghost\"", "unknown agent `ghost`"),
        ("input.missing", "no parameter `missing`"),
        ("id = \"one\"\nagent = \"a\"", "used twice"),
        ("steps.later.text", "no step `later`"),
    ];
    for (i, (needle, part)) in list.iter().zip(expect) {
        // The duplicate id is the second `id = "one"`.
        let line = if needle.starts_with("id = ") {
            line_of(&text, "steps.later.text") - 2
        } else {
            line_of(&text, needle)
        };
        assert_eq!(i.line, line, "{i}");
        assert!(i.message.contains(part), "{i}");
    }
    let lines: Vec<usize> = list.iter().map(|i| i.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "in file order");
}

#[test]
fn an_issue_displays_as_file_line_column_message() {
    let (_d, path) = file(&format!(
        "{BASE}{}",
        ONE_STEP.replace("agent = \"a\"", "agent = \"zz\"")
    ));
    let err = FlowSpec::load(&path, &[], &FlowEnv::new()).unwrap_err();
    let i = &err.issues[0];
    assert_eq!(i.file, path.display().to_string());
    assert_eq!((i.line, i.column), (14, 9));
    assert_eq!(
        i.to_string(),
        format!(
            "{}:14:9: step `one`: unknown agent `zz` (declared: a)",
            path.display()
        )
    );
    // The error as a whole is its issues, one per line.
    assert_eq!(err.to_string(), i.to_string());
    // A whole-file problem has no line.
    let missing = path.with_file_name("absent.toml");
    let e = FlowSpec::load(&missing, &[], &FlowEnv::new()).unwrap_err();
    assert_eq!(e.issues[0].line, 0);
    assert!(
        e.to_string().starts_with(&format!(
            "{}: cannot read the workflow file",
            missing.display()
        )),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// --set overrides
// ---------------------------------------------------------------------------------------------

#[test]
fn an_override_changes_a_nested_value_and_keeps_comments_and_lines() {
    let text = format!(
        "# A comment at the top.\n{}",
        for_each("concurrency = 2 # two at a time").replace(
            "model = \"x\"",
            "model = \"x\" # the model id\nprice = { input_per_mtok = 1.0, output_per_mtok = 5.0 }"
        )
    );
    let out = apply_overrides(
        &text,
        &[
            "models.m.model=claude-haiku-4-5".into(),
            "flow.0.concurrency=4".into(),
            "models.m.price.output_per_mtok=7.5".into(),
            "workflow.name=\"renamed\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(out.lines().count(), text.lines().count(), "{out}");
    assert!(out.starts_with("# A comment at the top.\n"), "{out}");
    let at = |needle: &str| {
        out.lines()
            .nth(line_of(&text, needle) - 1)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        at("model = \"x\""),
        "model = \"claude-haiku-4-5\" # the model id"
    );
    assert_eq!(at("concurrency = 2"), "concurrency = 4 # two at a time");
    assert!(
        at("price =").contains("output_per_mtok = 7.5"),
        "{}",
        at("price =")
    );
    assert!(
        at("price =").contains("input_per_mtok = 1.0"),
        "{}",
        at("price =")
    );
    assert_eq!(at("name = \"t\""), "name = \"renamed\"");
    // No changes: the text as it is.
    assert_eq!(apply_overrides(&text, &[]).unwrap(), text);
}

#[test]
fn an_override_of_something_the_file_lacks_is_refused_clearly() {
    let text = for_each("concurrency = 2");
    let e = apply_overrides(&text, &["routers.triage.model=fast".into()]).unwrap_err();
    assert_eq!(
        e,
        "`routers.triage.model`: `routers` is not in the file; --set changes settings of tables the file has"
    );
    let e = apply_overrides(&text, &["flow.3.concurrency=1".into()]).unwrap_err();
    assert_eq!(
        e,
        "`flow.3.concurrency`: `flow` is a list of 1; give an index from 0 to 0"
    );
    let e = apply_overrides(&text, &["flow.x.concurrency=1".into()]).unwrap_err();
    assert!(e.contains("give an index from 0 to 0"), "{e}");
    let e = apply_overrides(&text, &["flow.0=1".into()]).unwrap_err();
    assert!(e.contains("name a setting inside the list entry"), "{e}");
    let e = apply_overrides(&text, &["models.m.model.id=1".into()]).unwrap_err();
    assert!(e.contains("`model` is a value, not a table"), "{e}");
    let e = apply_overrides(&text, &["concurrency".into()]).unwrap_err();
    assert!(e.contains("is not KEY=VALUE"), "{e}");
    let e = apply_overrides(&text, &["models..model=x".into()]).unwrap_err();
    assert!(e.contains("is not a dotted key"), "{e}");
}

#[test]
fn a_loaded_file_with_overrides_is_validated_with_the_files_line_numbers() {
    let text = for_each("concurrency = 2");
    let (_d, path) = file(&text);
    let env = FlowEnv::new();
    let spec = FlowSpec::load(&path, &["flow.0.concurrency=8".into()], &env).unwrap();
    assert!(spec.text().contains("concurrency = 8"));
    // The hash is the file's as read, before the change.
    assert_eq!(
        spec.source_hash(),
        blake3::hash(text.as_bytes()).to_hex().to_string()
    );
    // An override that makes the file invalid is reported on the changed line.
    let err = FlowSpec::load(&path, &["flow.0.concurrency=0".into()], &env).unwrap_err();
    assert_eq!(err.issues.len(), 1);
    assert_eq!(err.issues[0].line, line_of(&text, "concurrency = 2"));
    assert!(
        err.issues[0]
            .message
            .contains("concurrency must be 1 to 1024")
    );
    // An override naming a setting the format does not have is an unknown field.
    let err = FlowSpec::load(&path, &["models.m.api_key=sk".into()], &env).unwrap_err();
    assert!(
        err.issues[0].message.contains("unknown field `api_key`"),
        "{err}"
    );
    // One naming a missing table is refused as a --set problem of the whole file.
    let err = FlowSpec::load(&path, &["tools.kb.root=x".into()], &env).unwrap_err();
    assert_eq!(err.issues[0].line, 0);
    assert!(
        err.issues[0].message.starts_with("--set: `tools.kb.root`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Run inputs
// ---------------------------------------------------------------------------------------------

fn templated_spec() -> (tempfile::TempDir, PathBuf, String, FlowSpec) {
    let text = TEMPLATED
        .replace("{PROMPT}", "Subject: {{ item.subject }}")
        .replace(
            "audience = \"support lead\"",
            "audience = \"support lead\"\nlimit = 3\nstrict = false",
        );
    let (d, path) = file(&text);
    let spec = FlowSpec::load(&path, &[], &FlowEnv::new()).unwrap();
    (d, path, text, spec)
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn an_undeclared_parameter_is_refused_naming_the_declared_ones() {
    let (_d, _p, _t, spec) = templated_spec();
    let items = vec![(1, json!({"id": 1, "subject": "a"}))];
    let e = spec.input(items, &pairs(&[("tone", "warm")])).unwrap_err();
    assert_eq!(
        e,
        "--param tone: the workflow declares no parameter `tone` (declared: audience, limit, strict); add it under [params]"
    );
}

#[test]
fn parameters_take_the_type_of_their_default() {
    let (_d, path, text, spec) = templated_spec();
    let items = vec![(1, json!({"id": 1, "subject": "a"}))];
    let input = spec
        .input(
            items.clone(),
            &pairs(&[("limit", "5"), ("audience", "ops team"), ("strict", "true")]),
        )
        .unwrap();
    assert_eq!(input.params["limit"], json!(5));
    assert_eq!(input.params["strict"], json!(true));
    // A string parameter takes the text as it is (no JSON quotes needed).
    assert_eq!(input.params["audience"], json!("ops team"));
    // Defaults fill the rest.
    let input2 = spec.input(items.clone(), &[]).unwrap();
    assert_eq!(input2.params["limit"], json!(3));
    assert_eq!(input2.params["audience"], json!("support lead"));
    // The input records everything a run needs without the file.
    assert_eq!(
        input,
        FlowInput {
            file: std::path::absolute(&path).unwrap().display().to_string(),
            source_hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
            spec: text.clone(),
            overrides: vec![],
            params: input.params.clone(),
            items: vec![json!({"id": 1, "subject": "a"})],
        }
    );
    let e = spec
        .input(items.clone(), &pairs(&[("limit", "five")]))
        .unwrap_err();
    assert!(
        e.starts_with(
            "--param limit=five: the default is 3, so the value must be JSON of that kind"
        ),
        "{e}"
    );
}

#[test]
fn an_item_without_a_field_a_prompt_uses_is_refused_naming_its_line_and_the_field() {
    let (_d, _p, text, spec) = templated_spec();
    let items = vec![
        (1, json!({"id": 1, "subject": "a"})),
        (2, json!({"id": 2, "subject": "b"})),
        (3, json!({"id": 3, "title": "c"})),
    ];
    let e = spec.input(items, &[]).unwrap_err();
    assert_eq!(
        e,
        format!(
            "input line 3: the item has no field `subject` (used by a prompt on line {} of the workflow file); every item needs it",
            line_of(&text, "{{ item.subject }}")
        )
    );
    // Without line numbers (items from a program), the item's position.
    let e = spec.input(vec![(0, json!({"id": 1}))], &[]).unwrap_err();
    assert!(
        e.starts_with("input item 0: the item has no field `subject`"),
        "{e}"
    );
    // A flow over items needs some.
    let e = spec.input(vec![], &[]).unwrap_err();
    assert!(
        e.contains("step `each` runs over the input items, and there are none"),
        "{e}"
    );
}

#[test]
fn min_required_above_the_item_count_and_a_missing_key_field_are_refused() {
    let text = for_each("min_required = 3\nkey = \"ref\"");
    let (_d, path) = file(&text);
    let spec = FlowSpec::load(&path, &[], &FlowEnv::new()).unwrap();
    let two = vec![
        (1, json!({"x": 1, "ref": "a"})),
        (2, json!({"x": 2, "ref": "b"})),
    ];
    assert_eq!(
        spec.input(two, &[]).unwrap_err(),
        "step `each` requires at least 3 successful items (min_required) but there are only 2 items"
    );
    let three = vec![
        (1, json!({"x": 1, "ref": "a"})),
        (2, json!({"x": 2})),
        (3, json!({"x": 3, "ref": "c"})),
    ];
    assert_eq!(
        spec.input(three, &[]).unwrap_err(),
        "input line 2: the item has no field `ref` (the `key` of step `each`); every item needs it"
    );
}

// ---------------------------------------------------------------------------------------------
// The interpreter on a real store
// ---------------------------------------------------------------------------------------------

const ROUTED: &str = r#"[workflow]
name = "triage"

[params]
product = "Cairn Cloud"

[models.fast]
provider = "recorded"
model = "haiku"

[models.smart]
provider = "recorded"
model = "sonnet"
price = { input_per_mtok = 3.0, output_per_mtok = 15.0 }

[agents.billing]
model = "smart"
system = "billing"

[agents.technical]
model = "smart"
system = "technical"

[agents.general]
model = "fast"
system = "general"

[agents.summarizer]
model = "smart"
system = "summarizer"

[routers.desk]
model = "fast"
fallback = "general"

[routers.desk.routes.billing]
agent = "billing"
description = "money"

[routers.desk.routes.technical]
agent = "technical"
description = "bugs"

[[flow]]
id = "tickets"
for_each = "items"
key = "id"
concurrency = 2

[[flow.steps]]
id = "triage"
router = "desk"
prompt = "Ticket {{ item.id }} about {{ input.product }}: {{ item.subject }}"

[[flow]]
id = "report"
agent = "summarizer"
prompt = """
{{ steps.tickets.succeeded }} of {{ steps.tickets.count }} ({{ steps.tickets.failed }} failed):
{{ steps.tickets.results }}"""
"#;

/// Requests seen by a scripted model.
type Seen = Arc<Mutex<Vec<ModelRequest>>>;

/// A model answering `f(request)` and keeping every request.
fn recording(
    seen: &Seen,
    f: impl Fn(&ModelRequest) -> Result<ModelResponse, ModelError> + Send + Sync + 'static,
) -> Arc<ScriptedModel> {
    let seen = Arc::clone(seen);
    Arc::new(ScriptedModel::from_fn(move |req| {
        seen.lock().unwrap().push(req.clone());
        f(req)
    }))
}

fn tickets() -> Vec<Value> {
    vec![
        json!({"id": "T-1", "subject": "I want a refund"}),
        json!({"id": "T-2", "subject": "the app crashes"}),
        json!({"id": "T-3", "subject": "dark mode please"}),
    ]
}

#[tokio::test]
async fn a_router_hands_each_item_to_its_specialist_and_the_report_sees_every_answer() {
    let (_sd, store) = store();
    let seen: Seen = Arc::default();
    let fast = recording(&seen, |req| {
        let system = req.system.clone().unwrap_or_default();
        let task = last_user(req);
        Ok(say(if system.starts_with("Classify") {
            if task.contains("refund") {
                "Billing."
            } else if task.contains("crash") {
                "technical"
            } else {
                "poetry"
            }
        } else {
            "general answer"
        }))
    });
    let smart = recording(&seen, |req| {
        Ok(say(match req.system.as_deref() {
            Some("billing") => "refund issued",
            Some("technical") => "bug filed",
            Some("summarizer") => "REPORT",
            other => panic!("unexpected system prompt {other:?}"),
        }))
    });
    let env = FlowEnv::new()
        .model("fast", fast.clone())
        .model("smart", smart.clone());
    let spec = load_env(ROUTED, &env).unwrap();
    let out = run_to_end(&store, env, &spec, &tickets()).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let output = out.output.unwrap();
    assert_eq!(
        output["steps"]["tickets"],
        json!({"count": 3, "succeeded": 3, "failed": 0})
    );
    assert_eq!(output["steps"]["report"]["text"], "REPORT");
    assert_eq!(output["steps"]["report"]["agent"], "summarizer");
    // 3 classifications, 3 answers, 1 report.
    assert_eq!((fast.calls(), smart.calls()), (4, 3));

    // The classifier saw the rendered prompt; the summarizer one line per item, in item order.
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|r| last_user(r) == "Ticket T-1 about Cairn Cloud: I want a refund"),
        "{seen:#?}"
    );
    let report = seen
        .iter()
        .find(|r| r.system.as_deref() == Some("summarizer"))
        .unwrap();
    assert_eq!(
        last_user(report),
        "3 of 3 (0 failed):\n- T-1: refund issued\n- T-2: bug filed\n- T-3: general answer\n"
    );

    // The route decisions are recorded.
    let id: RunId = out.run_id.parse().unwrap();
    let mut routes: Vec<(String, String, bool)> = step_outputs(&store, id, "route")
        .await
        .into_iter()
        .map(|v| {
            (
                v["category"].as_str().unwrap().to_string(),
                v["agent"].as_str().unwrap().to_string(),
                v["fallback"].as_bool().unwrap(),
            )
        })
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            ("billing".into(), "billing".into(), false),
            ("poetry".into(), "general".into(), true),
            ("technical".into(), "technical".into(), false),
        ]
    );

    // The follower's item results carry the key, the route and the specialist's answer.
    let results = follow_all(&store, id).await;
    assert_eq!(results.len(), 3);
    let expect = [
        ("T-1", "billing", "billing", "refund issued", false),
        ("T-2", "technical", "technical", "bug filed", false),
        ("T-3", "poetry", "general", "general answer", true),
    ];
    for (i, (r, (key, category, agent, text, fallback))) in results.iter().zip(expect).enumerate() {
        assert_eq!(
            (r.step.as_str(), r.index, r.key.clone(), r.ok, &r.error),
            ("tickets", i as u32, Some(json!(key)), true, &None)
        );
        let t = &r.output.as_ref().unwrap()["triage"];
        assert_eq!(t["category"], category);
        assert_eq!(t["agent"], agent);
        assert_eq!(t["text"], text);
        assert_eq!(t["fallback"], fallback);
        assert_eq!(t["turns"], 1);
    }
    // The specialists' calls are priced (smart), the general agent's are not (fast).
    let t1 = &results[0].output.as_ref().unwrap()["triage"];
    assert!((t1["cost_usd"].as_f64().unwrap() - (100.0 * 3.0 + 20.0 * 15.0) / 1e6).abs() < 1e-12);
    assert_eq!(
        results[2].output.as_ref().unwrap()["triage"]["cost_usd"],
        Value::Null
    );
}

const RELAY: &str = r#"[workflow]
name = "relay"

[params]
topic = "durable logs"

[models.m]
provider = "recorded"
model = "big"

[models.cheap]
provider = "recorded"
model = "small"
price = { input_per_mtok = 1000.0, output_per_mtok = 5000.0 }

[agents.researcher]
model = "m"
system = "research"

[agents.writer]
model = "m"
system = "write"

[agents.editor]
model = "m"
system = "edit"

[[flow]]
id = "research"
agent = "researcher"
prompt = "Find facts about {{ input.topic }}"

[[flow]]
id = "draft"
agent = "writer"
handoff = { from = "research", mode = "full" }
prompt = "write it up"

[[flow]]
id = "edit"
agent = "editor"
handoff = { from = "draft", mode = "summary", model = "cheap", max_tokens = 64 }
"#;

#[tokio::test]
async fn a_full_handoff_passes_the_conversation_and_a_summary_handoff_a_summary() {
    let (_sd, store) = store();
    let seen: Seen = Arc::default();
    let m = recording(&seen, |req| {
        Ok(say(match req.system.as_deref() {
            Some("research") => "FACTS",
            Some("write") => "DRAFT",
            Some("edit") => "FINAL",
            other => panic!("unexpected system prompt {other:?}"),
        }))
    });
    let cheap = recording(&seen, |_| Ok(say("SUMMARY")));
    let env = FlowEnv::new().model("m", m).model("cheap", cheap);
    let spec = load_env(RELAY, &env).unwrap();
    let input = spec.input(vec![], &pairs(&[("topic", "queues")])).unwrap();
    let out = engine(&store, env)
        .start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let output = out.output.unwrap();
    assert_eq!(output["workflow"], "relay");
    assert_eq!(output["steps"]["research"]["text"], "FACTS");
    assert_eq!(output["steps"]["draft"]["text"], "DRAFT");
    assert_eq!(output["steps"]["edit"]["text"], "FINAL");
    assert_eq!(output["steps"]["edit"]["agent"], "editor");

    let seen = seen.lock().unwrap().clone();
    let by = |s: &str| {
        seen.iter()
            .find(|r| r.system.as_deref().is_some_and(|x| x.starts_with(s)))
            .unwrap()
            .clone()
    };
    // The writer got the researcher's whole conversation, then the handover note with the
    // step's prompt as the reason.
    let w = by("write");
    let texts: Vec<(Role, String)> = w.messages.iter().map(|m| (m.role, m.text())).collect();
    assert_eq!(
        texts,
        [
            (Role::User, "Find facts about queues".to_string()),
            (Role::Assistant, "FACTS".to_string()),
            (
                Role::User,
                "You are taking over from agent `researcher` (write it up). Continue the task."
                    .to_string()
            ),
        ]
    );
    // The summary model read the writer's conversation with its token limit...
    let s = by("Summarize");
    assert_eq!((s.model.as_str(), s.max_tokens), ("small", 64));
    assert!(last_user(&s).contains("DRAFT") && last_user(&s).contains("Find facts about queues"));
    // ...and the editor got only the summary.
    let e = by("edit");
    assert_eq!(e.messages.len(), 1);
    assert_eq!(
        e.messages[0].text(),
        "You are taking over from agent `writer` (flow step `edit`). Continue the task.\nSummary of the work so far:\nSUMMARY"
    );
    // Both handoffs are recorded.
    let id: RunId = out.run_id.parse().unwrap();
    let modes: Vec<(String, String, String)> = step_outputs(&store, id, "handoff")
        .await
        .into_iter()
        .map(|v| {
            (
                v["from"].as_str().unwrap().into(),
                v["to"].as_str().unwrap().into(),
                v["mode"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("researcher".into(), "writer".into(), "full".into()),
            ("writer".into(), "editor".into(), "summary".into()),
        ]
    );
    // The summary's tokens are on its record (and counted with the step, for `[budget]`).
    let handoffs = step_outputs(&store, id, "handoff").await;
    let usage: Vec<Option<u64>> = handoffs
        .iter()
        .map(|v| v["summary_usage"]["output_tokens"].as_u64())
        .collect();
    assert_eq!(usage, [None, Some(20)]);
    // ...and its cost, at the summary model's price: 100 input and 20 output tokens.
    let cost = handoffs[1]["summary_cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (100.0 * 1000.0 + 20.0 * 5000.0) / 1e6).abs() < 1e-9,
        "{cost}"
    );
}

const FALLBACK: &str = r#"[workflow]
name = "fb"

[models.flaky]
provider = "recorded"
model = "f"

[models.m]
provider = "recorded"
model = "g"

[agents.primary]
model = "flaky"
system = "primary"

[agents.backup]
model = "m"
system = "backup"

[[flow]]
id = "answer"
agent = "primary"
prompt = "help me"
fallback = "backup"

[[flow]]
id = "after"
agent = "backup"
prompt = "Got: {{ steps.answer.text }} via {{ steps.answer.agent }}"
"#;

#[tokio::test]
async fn a_fallback_agent_answers_when_the_primarys_model_fails_for_good() {
    let (_sd, store) = store();
    let seen: Seen = Arc::default();
    let flaky = recording(&seen, |_| {
        Err(ModelError::new(
            ModelErrorKind::BadRequest,
            "model `f` does not exist",
        ))
    });
    let m = recording(&seen, |req| Ok(say(&format!("backup: {}", last_user(req)))));
    let env = FlowEnv::new().model("flaky", flaky.clone()).model("m", m);
    let spec = load_env(FALLBACK, &env).unwrap();
    let out = run_to_end(&store, env, &spec, &[]).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let output = out.output.unwrap();
    assert_eq!(output["steps"]["answer"]["fallback"], "backup");
    assert_eq!(output["steps"]["answer"]["agent"], "backup");
    assert_eq!(output["steps"]["answer"]["text"], "backup: help me");
    // The next step sees the fallback's answer.
    assert_eq!(
        output["steps"]["after"]["text"],
        "backup: Got: backup: help me via backup"
    );
    assert!(
        output["steps"]["after"]["fallback"].is_null(),
        "no fallback ran for `after`"
    );
    // A non-retryable error is not retried.
    assert_eq!(flaky.calls(), 1);

    // Without a fallback the run fails with the model's error.
    let (_sd2, store2) = self::store();
    let flaky2 = Arc::new(ScriptedModel::from_fn(|_| {
        Err(ModelError::new(
            ModelErrorKind::BadRequest,
            "model `f` does not exist",
        ))
    }));
    let env = FlowEnv::new()
        .model("flaky", flaky2)
        .model("m", Arc::new(ScriptedModel::from_fn(|_| Ok(say("x")))));
    let text = FALLBACK.replace("fallback = \"backup\"\n", "");
    let spec = load_env(&text, &env).unwrap();
    let out = run_to_end(&store2, env, &spec, &[]).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert!(
        out.error.as_deref().unwrap().contains("does not exist"),
        "{:?}",
        out.error
    );
}

fn batch(settings: &str, model: &str) -> String {
    format!(
        r#"[workflow]
name = "batch"

[models.m]
provider = "recorded"
model = "{model}"
price = {{ input_per_mtok = 1.0, output_per_mtok = 5.0 }}

[agents.a]
model = "m"
system = "answer"

[[flow]]
id = "each"
for_each = "items"
key = "id"
{settings}

[[flow.steps]]
id = "answer"
agent = "a"
prompt = "{{{{ item.text }}}}"
"#
    )
}

fn numbered(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"id": format!("I-{i}"), "text": format!("item {i}")}))
        .collect()
}

#[tokio::test]
async fn with_min_required_failed_items_are_reported_and_the_run_completes() {
    let poisoned = || {
        Arc::new(ScriptedModel::from_fn(|req| {
            let task = last_user(req);
            if task.contains("poison") {
                Err(ModelError::new(
                    ModelErrorKind::BadRequest,
                    "poison rejected",
                ))
            } else {
                Ok(say(&format!("ok {task}")))
            }
        }))
    };
    let items = vec![
        json!({"id": "a", "text": "fine 1"}),
        json!({"id": "b", "text": "poison 1"}),
        json!({"id": "c", "text": "fine 2"}),
        json!({"id": "d", "text": "poison 2"}),
    ];
    let (_sd, store) = store();
    let env = FlowEnv::new().model("m", poisoned());
    let spec = load_env(&batch("min_required = 2\nconcurrency = 4", "x"), &env).unwrap();
    let out = run_to_end(&store, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!(
        out.output.unwrap()["steps"]["each"],
        json!({"count": 4, "succeeded": 2, "failed": 2})
    );
    let id: RunId = out.run_id.parse().unwrap();
    let results = follow_all(&store, id).await;
    let summary: Vec<(u32, Option<Value>, bool)> = results
        .iter()
        .map(|r| (r.index, r.key.clone(), r.ok))
        .collect();
    assert_eq!(
        summary,
        [
            (0, Some(json!("a")), true),
            (1, Some(json!("b")), false),
            (2, Some(json!("c")), true),
            (3, Some(json!("d")), false),
        ]
    );
    assert_eq!(
        results[0].output.as_ref().unwrap()["answer"]["text"],
        "ok fine 1"
    );
    for r in [&results[1], &results[3]] {
        assert!(r.output.is_none());
        assert!(
            r.error.as_deref().unwrap().contains("poison rejected"),
            "{r:?}"
        );
    }

    // Requiring more successes than happen fails the run, with the items still reported.
    // One at a time: the policy can only decide after the last item (2 of 3 possible
    // successes remain until then), so every item has run; with items in flight at once, the
    // second failure decides early and stops what is still running (timing-dependent).
    let (_sd2, store2) = self::store();
    let env = FlowEnv::new().model("m", poisoned());
    let spec = load_env(&batch("min_required = 3\nconcurrency = 1", "x"), &env).unwrap();
    let out = run_to_end(&store2, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Failed);
    assert!(
        out.error
            .as_deref()
            .unwrap()
            .contains("at least 3 are required"),
        "{:?}",
        out.error
    );
    let id: RunId = out.run_id.parse().unwrap();
    assert_eq!(follow_all(&store2, id).await.len(), 4);
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Lookup {
    id: String,
}

#[tokio::test]
async fn an_agent_calls_a_tool_registered_from_rust() {
    let (_sd, store) = store();
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let lookup = {
        let asked = Arc::clone(&asked);
        tool("lookup", "Find a ticket by id", move |i: Lookup| {
            let asked = Arc::clone(&asked);
            async move {
                asked.lock().unwrap().push(i.id.clone());
                Ok::<_, ToolError>(json!({"id": i.id, "subject": "charged twice"}))
            }
        })
    };
    let seen: Seen = Arc::default();
    let model = recording(&seen, |req| {
        let turn = req
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        Ok(if turn == 0 {
            ModelResponse {
                id: String::new(),
                model: "scripted".into(),
                content: vec![Block::ToolUse {
                    id: "u1".into(),
                    name: "lookup".into(),
                    input: json!({"id": "T-7"}),
                }],
                stop_reason: StopReason::ToolUse,
                usage: usage(50, 10),
            }
        } else {
            say("T-7 is a billing question")
        })
    });
    let text = BASE.replace("model = \"m\"\n", "model = \"m\"\ntools = [\"lookup\"]\n")
        + &ONE_STEP.replace("prompt = \"hi\"", "prompt = \"Look at T-7\"");
    let env = FlowEnv::new().model("m", model).tool(lookup);
    let spec = load_env(&text, &env).unwrap();
    let out = run_to_end(&store, env, &spec, &[]).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let one = &out.output.unwrap()["steps"]["one"];
    assert_eq!(one["text"], "T-7 is a billing question");
    assert_eq!(
        (one["turns"].clone(), one["tool_calls"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(
        (one["input_tokens"].clone(), one["output_tokens"].clone()),
        (json!(150), json!(30))
    );
    assert_eq!(*asked.lock().unwrap(), ["T-7"]);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    // The tool was offered with its schema, and its result reached the model.
    assert_eq!(seen[0].tools[0].name, "lookup");
    assert!(seen[0].tools[0].input_schema["properties"]["id"].is_object());
    let Block::ToolResult {
        content, is_error, ..
    } = &seen[1].messages[2].content[0]
    else {
        panic!("{:?}", seen[1].messages)
    };
    assert!(!is_error && content.contains("charged twice"), "{content}");
    let id: RunId = out.run_id.parse().unwrap();
    let calls = step_outputs(&store, id, "tool:lookup").await;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["input"], json!({"id": "T-7"}));
}

#[tokio::test]
async fn the_follower_reports_each_item_once_and_its_spending_matches_the_recorded_calls() {
    let (_sd, store) = store();
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let env = FlowEnv::new().model("m", model.clone());
    let spec = load_env(&batch("concurrency = 2", "x"), &env).unwrap();
    let items = numbered(7);
    let input = spec.input(lines(&items), &[]).unwrap();
    let e = engine(&store, env);
    let h = e
        .start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap();
    let id = h.id;
    let wait = tokio::spawn(h.wait());
    // Poll while the run goes and after it ends, many times.
    let mut follower = FlowFollower::new(id);
    let mut got = Vec::new();
    while !wait.is_finished() {
        got.extend(follower.poll(store.as_ref()).await.unwrap());
        tokio::task::yield_now().await;
    }
    let out = wait.await.unwrap().unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    for _ in 0..3 {
        got.extend(follower.poll(store.as_ref()).await.unwrap());
    }
    let mut indexes: Vec<u32> = got.iter().map(|r| r.index).collect();
    indexes.sort();
    assert_eq!(
        indexes,
        (0..7).collect::<Vec<u32>>(),
        "each item exactly once"
    );
    for r in &got {
        assert_eq!(r.key, Some(json!(format!("I-{}", r.index))));
        assert_eq!(
            r.output.as_ref().unwrap()["answer"]["text"],
            format!("answer to item {}", r.index)
        );
    }
    // The progress: 7 calls of 100 + 20 tokens at $1 / $5 per million.
    let p = follower.progress().clone();
    assert_eq!(
        (p.items_total, p.succeeded, p.failed, p.model_calls),
        (7, 7, 0, 7)
    );
    assert_eq!((p.input_tokens, p.output_tokens), (700, 140));
    assert!(
        (p.cost_usd - 7.0 * (100.0 + 20.0 * 5.0) / 1e6).abs() < 1e-12,
        "{p:?}"
    );
    assert_eq!(model.calls(), 7);
    // ...which is what the log's model calls say.
    let calls: Vec<ModelCall> = step_outputs(&store, id, "model")
        .await
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(calls.len() as u64, p.model_calls);
    let cost: f64 = calls.iter().map(|c| c.cost_usd.unwrap()).sum();
    assert!((cost - p.cost_usd).abs() < 1e-12);
    let tokens: u64 = calls.iter().map(|c| c.response.usage.input_tokens).sum();
    assert_eq!(tokens, p.input_tokens);
    // A new follower reads the whole log again (how an output file is completed after a
    // resume).
    assert_eq!(follow_all(&store, id).await.len(), 7);
}

/// A model that answers its first `open` calls and leaves the later ones pending forever (a
/// call in flight when the process stops).
struct Gated {
    inner: ScriptedModel,
    open: u64,
    calls: AtomicU64,
}

impl Gated {
    fn new(open: u64) -> Arc<Gated> {
        Arc::new(Gated {
            inner: ScriptedModel::from_fn(|req| Ok(say(&format!("answer to {}", last_user(req))))),
            open,
            calls: AtomicU64::new(0),
        })
    }
}

impl Model for Gated {
    fn provider(&self) -> &str {
        "scripted"
    }

    fn call(&self, req: ModelRequest) -> BoxFuture<'_, Result<ModelResponse, ModelError>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) >= self.open {
            return Box::pin(std::future::pending());
        }
        self.inner.call(req)
    }
}

/// Starts a 6-item batch whose model answers 3 calls, waits until those 3 items are recorded
/// and 2 more calls are in flight, and stops the engine. Returns the run and the follower that
/// saw the first 3 items.
async fn start_and_stop_mid_batch(
    store: &Arc<dyn EventStore>,
    text: &str,
) -> (RunId, FlowFollower, Vec<ItemResult>) {
    let gated = Gated::new(3);
    let env = FlowEnv::new().model("m", gated.clone());
    let spec = load_env(text, &env).unwrap();
    let input = spec.input(lines(&numbered(6)), &[]).unwrap();
    let e = engine(store, env);
    let h = e
        .start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap();
    let id = h.id;
    let mut follower = FlowFollower::new(id);
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < 3 || gated.calls.load(Ordering::SeqCst) < 5 {
            got.extend(follower.poll(store.as_ref()).await.unwrap());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("three items finish and two calls hang");
    e.shutdown();
    let out = h.wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Running, "stopped, resumable");
    got.extend(follower.poll(store.as_ref()).await.unwrap());
    assert_eq!(got.len(), 3, "{got:?}");
    (id, follower, got)
}

#[tokio::test]
async fn a_resumed_batch_does_not_call_the_model_again_for_finished_items() {
    let (_sd, store) = store();
    let text = batch("concurrency = 2", "x");
    let (id, mut follower, mut got) = start_and_stop_mid_batch(&store, &text).await;

    // A new engine on the same store, as a new process would have.
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let out = engine(&store, FlowEnv::new().model("m", model.clone()))
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!(
        out.output.unwrap()["steps"]["each"],
        json!({"count": 6, "succeeded": 6, "failed": 0})
    );
    assert_eq!(
        model.calls(),
        3,
        "only the 3 unfinished items call the model (the 2 in flight run again)"
    );
    // The follower that saw the first half reports only the rest.
    let rest = follower.poll(store.as_ref()).await.unwrap();
    assert_eq!(rest.len(), 3, "{rest:?}");
    got.extend(rest);
    let indexes: BTreeSet<u32> = got.iter().map(|r| r.index).collect();
    assert_eq!(indexes.len(), 6);
    assert_eq!(follower.progress().model_calls, 6);
    for r in &got {
        assert_eq!(
            r.output.as_ref().unwrap()["answer"]["text"],
            format!("answer to item {}", r.index)
        );
    }
}

#[tokio::test]
async fn a_resumed_batch_counts_what_its_finished_items_spent_against_the_budget() {
    let (_sd, store) = store();
    // 120 tokens a call. The 3 items finished before the stop spent 360; the 2 in flight at
    // the stop start again at once (360 < 450), and whichever finishes first takes the total to
    // 480, past 450, so the sixth item never starts, whatever the order. Before this was
    // fixed, a resumed batch counted only its new calls (120 after the first, under 450) and
    // ran all three. (With 500, the sixth item could start at 480 or not depending on which
    // in-flight item finished first.)
    let text = format!(
        "{}\n[budget]\nmax_tokens = 450\n",
        batch("concurrency = 2", "x")
    );
    let (id, _follower, _got) = start_and_stop_mid_batch(&store, &text).await;
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let mut reg = Registry::new();
    register_flows(&mut reg, FlowEnv::new().model("m", model.clone()));
    let e = Engine::with_options(
        Arc::clone(&store),
        reg,
        cairn_engine::EngineOptions {
            suspend_after: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let out = e.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(
        out.status,
        RunStatus::Waiting,
        "parked on the budget: {:?}",
        out.error
    );
    let exhausted = step_outputs(&store, id, "budget_exhausted").await;
    assert!(!exhausted.is_empty());
    let spent = exhausted[0]["spent_tokens"].as_u64().unwrap();
    assert!(spent >= 450, "{exhausted:?}");
    assert!(model.calls() <= 2, "{} calls", model.calls());
}

const KEYED: &str = r#"[models.m]
provider = "anthropic"
model = "claude-haiku-4-5"
api_key_env = "CAIRN_SPEC_TEST_UNSET_KEY"
"#;

#[tokio::test]
async fn a_missing_api_key_is_refused_before_a_run_and_leaves_a_resumed_run_unchanged() {
    assert!(std::env::var_os("CAIRN_SPEC_TEST_UNSET_KEY").is_none());
    let text = batch("concurrency = 2", "x").replace(
        "[models.m]\nprovider = \"recorded\"\nmodel = \"x\"\n",
        KEYED,
    );
    assert!(text.contains("api_key_env"), "{text}");
    // The file is valid; this process just cannot run it.
    let spec = load_env(&text, &FlowEnv::new()).unwrap();
    assert_eq!(
        spec.check_runnable(&FlowEnv::new()).unwrap_err(),
        "model `m` (provider anthropic) needs an API key in $CAIRN_SPEC_TEST_UNSET_KEY"
    );
    let replaced = FlowEnv::new().model("m", Gated::new(0));
    spec.check_runnable(&replaced).unwrap();

    // A run started where the model works, stopped, then resumed where the key is missing.
    let (_sd, store) = store();
    let (id, _, _) = start_and_stop_mid_batch(&store, &text).await;
    let before = store.run(id).await.unwrap().unwrap();
    let err = engine(&store, FlowEnv::new())
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    match &err {
        EngineError::Interrupted(Interrupt::Unavailable { run, detail }) => {
            assert_eq!(*run, id);
            assert!(detail.contains("$CAIRN_SPEC_TEST_UNSET_KEY"), "{detail}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(err.to_string().contains("the run is unchanged"), "{err}");
    let after = store.run(id).await.unwrap().unwrap();
    assert_eq!(after.status, RunStatus::Running);
    // The engine marks every resume in the log; nothing else is recorded (no step, no
    // failure).
    let new: Vec<Event> = store
        .read(id, Seq(before.events), 100)
        .await
        .unwrap()
        .iter()
        .map(|e| Event::decode(&e.payload).unwrap())
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(matches!(new[0], Event::RunResumed { .. }), "{new:?}");
    // Where the model works again, the run finishes the remaining items.
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let out = engine(&store, FlowEnv::new().model("m", model.clone()))
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!(model.calls(), 3);
}

#[tokio::test]
async fn the_triage_example_runs_offline_from_its_recorded_answers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/triage");
    let env = FlowEnv::new();
    // Without the pacing, so the test is quick.
    let sets = [
        "models.fast.latency_ms=0".to_string(),
        "models.smart.latency_ms=0".to_string(),
    ];
    let spec = FlowSpec::load(&dir.join("triage.toml"), &sets, &env).unwrap();
    spec.check_runnable(&env).unwrap();
    let items: Vec<Value> = std::fs::read_to_string(dir.join("tickets.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(items.len(), 300);
    let (_sd, store) = store();
    let out = run_to_end(&store, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let output = out.output.unwrap();
    assert_eq!(
        output["steps"]["tickets"],
        json!({"count": 300, "succeeded": 300, "failed": 0})
    );
    assert!(
        !output["steps"]["report"]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    let id: RunId = out.run_id.parse().unwrap();
    let results = follow_all(&store, id).await;
    assert_eq!(results.len(), 300);
    assert_eq!(results[0].key, Some(json!("T-01000")));
    let categories: BTreeSet<String> = results
        .iter()
        .map(|r| {
            r.output.as_ref().unwrap()["triage"]["agent"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        categories.into_iter().collect::<Vec<_>>(),
        ["account", "billing", "general", "technical"]
    );
}

#[tokio::test]
async fn a_resumed_batch_counts_what_its_failed_items_spent_against_the_budget() {
    // One item at a time calls `a` (120 tokens), then `b`, which rejects the items marked
    // poison (for free). Items 0 and 1 fail having spent 240; item 2's call to `a` takes the
    // total to 360, past the limit of 300, so it parks before calling `b`. Resumed, the batch
    // must count the failed items' 240 again (item 2's recorded call is replayed and counts
    // itself): before failures were recorded with what they spent, a resumed batch counted
    // 120, and went on past the recorded stop (a non-determinism error, before budget checks
    // followed the history on replay) or, once raised, past the new limit.
    let text = r#"[workflow]
name = "batch"

[models.m]
provider = "recorded"
model = "x"

[models.p]
provider = "recorded"
model = "y"

[agents.a]
model = "m"
system = "answer"

[agents.b]
model = "p"
system = "check"

[[flow]]
id = "each"
for_each = "items"
key = "id"
concurrency = 1
min_required = 1

[[flow.steps]]
id = "answer"
agent = "a"
prompt = "{{ item.text }}"

[[flow.steps]]
id = "check"
agent = "b"
prompt = "{{ item.text }}"

[budget]
max_tokens = 300
"#;
    let env = || {
        let answer = Arc::new(ScriptedModel::from_fn(|req| {
            Ok(say(&format!("answer to {}", last_user(req))))
        }));
        let check = Arc::new(ScriptedModel::from_fn(|req| {
            let task = last_user(req);
            if task.contains("poison") {
                Err(ModelError::new(
                    ModelErrorKind::BadRequest,
                    "poison rejected",
                ))
            } else {
                Ok(say(&format!("checked {task}")))
            }
        }));
        (
            FlowEnv::new()
                .model("m", answer.clone())
                .model("p", check.clone()),
            answer,
            check,
        )
    };
    let parking = |store: &Arc<dyn EventStore>, env: FlowEnv| {
        let mut reg = Registry::new();
        register_flows(&mut reg, env);
        Engine::with_options(
            Arc::clone(store),
            reg,
            cairn_engine::EngineOptions {
                suspend_after: Duration::from_millis(50),
                ..Default::default()
            },
        )
    };
    let items: Vec<Value> = (0..6)
        .map(|i| {
            let text = if i < 3 {
                format!("poison {i}")
            } else {
                format!("item {i}")
            };
            json!({"id": format!("I-{i}"), "text": text})
        })
        .collect();
    let (_sd, store) = store();
    let (first_env, answer, check) = env();
    let spec = load_env(text, &first_env).unwrap();
    let input = spec.input(lines(&items), &[]).unwrap();
    let out = parking(&store, first_env)
        .start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Waiting, "{:?}", out.error);
    assert_eq!((answer.calls(), check.calls()), (3, 2));
    let id: RunId = out.run_id.parse().unwrap();
    let failed = follow_all(&store, id).await;
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().all(|r| !r.ok));
    // The failures carry what each item spent (`cairn events` shows it as `details`).
    let details = failure_details(&store, id).await;
    assert_eq!(details.len(), 2);
    assert!(
        details.iter().all(|d| d["spent"]["tokens"] == 120),
        "{details:?}"
    );

    // A new engine, as a new process would have: the budget is still spent.
    let (second_env, answer, check) = env();
    let out = parking(&store, second_env)
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Waiting, "{:?}", out.error);
    assert_eq!(
        (answer.calls(), check.calls()),
        (0, 0),
        "no item runs past the budget after a resume"
    );
    let exhausted = step_outputs(&store, id, "budget_exhausted").await;
    assert_eq!(
        exhausted.last().unwrap()["spent_tokens"],
        360,
        "{exhausted:?}"
    );

    // Raised to 500, the run goes on from 360: item 2's `b` rejects it (free), item 3 spends
    // 240 (600), and item 4 stops before its first call. Counting from 120 (without the
    // failed items' 240), item 4 would have run too.
    let (third_env, answer, check) = env();
    let e = parking(&store, third_env);
    e.signal(id, "budget", json!({ "max_tokens": 500 }))
        .await
        .unwrap();
    let out = e.resume(id).await.unwrap().wait().await.unwrap();
    assert_eq!(out.status, RunStatus::Waiting, "{:?}", out.error);
    assert_eq!((answer.calls(), check.calls()), (1, 2));
    let exhausted = step_outputs(&store, id, "budget_exhausted").await;
    assert_eq!(
        exhausted.last().unwrap()["spent_tokens"],
        600,
        "{exhausted:?}"
    );
}

#[tokio::test]
async fn an_items_spending_counts_the_calls_of_an_agent_that_failed_before_its_fallback() {
    let text = r#"[workflow]
name = "fbeach"

[models.flaky]
provider = "recorded"
model = "f"

[models.m]
provider = "recorded"
model = "g"

[agents.primary]
model = "flaky"
system = "primary"
tools = ["lookup"]

[agents.backup]
model = "m"
system = "backup"

[[flow]]
id = "each"
for_each = "items"

[[flow.steps]]
id = "answer"
agent = "primary"
prompt = "{{ item.text }}"
fallback = "backup"
"#;
    // The primary asks for the tool (120 tokens), then its next request is rejected for good;
    // the backup answers (120 tokens).
    let flaky = Arc::new(ScriptedModel::from_fn(|req| {
        if req.messages.len() == 1 {
            Ok(ModelResponse {
                id: String::new(),
                model: "scripted".into(),
                content: vec![Block::ToolUse {
                    id: "u1".into(),
                    name: "lookup".into(),
                    input: json!({"id": "T-7"}),
                }],
                stop_reason: StopReason::ToolUse,
                usage: usage(100, 20),
            })
        } else {
            Err(ModelError::new(ModelErrorKind::BadRequest, "rejected"))
        }
    }));
    let lookup = tool("lookup", "Find a ticket by id", |i: Lookup| async move {
        Ok::<_, ToolError>(json!({"id": i.id}))
    });
    let backup = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("backup: {}", last_user(req))))
    }));
    let env = FlowEnv::new()
        .model("flaky", flaky.clone())
        .model("m", backup.clone())
        .tool(lookup);
    let (_sd, store) = store();
    let spec = load_env(text, &env).unwrap();
    let out = run_to_end(&store, env, &spec, &[json!({"text": "T-7?"})]).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!((flaky.calls(), backup.calls()), (2, 1));
    let id: RunId = out.run_id.parse().unwrap();
    let spent: Vec<Value> = run_events(&store, id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::BranchCompleted { output, .. } => Some(output.to_json()["spent"].clone()),
            _ => None,
        })
        .collect();
    // Both agents' calls: what a resumed batch counts against `[budget]` for this item.
    assert_eq!(spent.len(), 1);
    assert_eq!(spent[0]["tokens"], 240, "{spent:?}");
}

#[tokio::test]
async fn a_failed_items_spending_counts_a_summary_handoff_whose_agent_failed() {
    let text = r#"[workflow]
name = "relayeach"

[models.m]
provider = "recorded"
model = "x"

[models.cheap]
provider = "recorded"
model = "small"

[agents.writer]
model = "m"
system = "write"

[agents.editor]
model = "m"
system = "edit"

[[flow]]
id = "each"
for_each = "items"
min_required = 1

[[flow.steps]]
id = "draft"
agent = "writer"
prompt = "{{ item.text }}"

[[flow.steps]]
id = "edit"
agent = "editor"
handoff = { from = "draft", mode = "summary", model = "cheap", max_tokens = 64 }
"#;
    // The writer (120 tokens) and the summary (120) are paid for; the editor is rejected.
    let m = Arc::new(ScriptedModel::from_fn(|req| match req.system.as_deref() {
        Some("edit") => Err(ModelError::new(ModelErrorKind::BadRequest, "rejected")),
        _ => Ok(say("DRAFT")),
    }));
    let cheap = Arc::new(ScriptedModel::from_fn(|_| Ok(say("SUMMARY"))));
    let env = FlowEnv::new().model("m", m).model("cheap", cheap.clone());
    let (_sd, store) = store();
    let spec = load_env(text, &env).unwrap();
    let items = [json!({"text": "one"}), json!({"text": "two"})];
    let out = run_to_end(&store, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Failed, "{:?}", out.error);
    assert_eq!(cheap.calls(), 2);
    let id: RunId = out.run_id.parse().unwrap();
    let spent: Vec<Value> = failure_details(&store, id)
        .await
        .into_iter()
        .map(|d| d["spent"].clone())
        .collect();
    assert_eq!(spent.len(), 2);
    assert!(spent.iter().all(|s| s["tokens"] == 240), "{spent:?}");
}

#[tokio::test]
async fn a_failed_items_spending_counts_the_classification_of_a_router_whose_agent_failed() {
    // `ROUTED` with `min_required` so the run goes on; the classifier (on `fast`) answers
    // billing (120 tokens), and the billing agent (on `smart`) is rejected.
    let text = ROUTED.replace("concurrency = 2", "concurrency = 2\nmin_required = 1");
    let fast = Arc::new(ScriptedModel::from_fn(|req| match req.system.as_deref() {
        Some("general") => Ok(say("general answer")),
        _ => Ok(say("billing")),
    }));
    let smart = Arc::new(ScriptedModel::from_fn(|req| match req.system.as_deref() {
        Some("summarizer") => Ok(say("REPORT")),
        _ => Err(ModelError::new(ModelErrorKind::BadRequest, "rejected")),
    }));
    let env = FlowEnv::new().model("fast", fast).model("smart", smart);
    let (_sd, store) = store();
    let spec = load_env(&text, &env).unwrap();
    let items = [json!({"id": "T-1", "subject": "refund"})];
    let out = run_to_end(&store, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Failed, "{:?}", out.error);
    let id: RunId = out.run_id.parse().unwrap();
    let spent: Vec<Value> = failure_details(&store, id)
        .await
        .into_iter()
        .map(|d| d["spent"].clone())
        .collect();
    assert_eq!(spent.len(), 1);
    assert_eq!(spent[0]["tokens"], 120, "{spent:?}");
}

const NESTED: &str = r#"[workflow]
name = "docs"

[models.m]
provider = "recorded"
model = "x"

[agents.a]
model = "m"
system = "answer"

[[flow]]
id = "docs"
for_each = "items"
key = "id"

[[flow.steps]]
id = "chunks"
for_each = "item.chunks"
concurrency = 2

[[flow.steps.steps]]
id = "note"
agent = "a"
prompt = "note on {{ item }} of {{ parent.id }}"

[[flow.steps]]
id = "sum"
agent = "a"
prompt = "sum of {{ steps.chunks.succeeded }}: {{ steps.chunks.results }}"
"#;

#[tokio::test]
async fn a_for_each_inside_a_for_each_runs_over_an_array_in_each_item() {
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("re: {}", last_user(req))))
    }));
    let env = FlowEnv::new().model("m", model.clone());
    let (_sd, store) = store();
    let spec = load_env(NESTED, &env).unwrap();
    let items = [
        json!({"id": "d1", "chunks": ["a", "b"]}),
        json!({"id": "d2", "chunks": ["c"]}),
    ];
    let out = run_to_end(&store, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    // Three notes and two sums.
    assert_eq!(model.calls(), 5);
    let id: RunId = out.run_id.parse().unwrap();
    // One result per document (the inner items are in its output), in order.
    let results = follow_all(&store, id).await;
    assert_eq!(results.len(), 2, "{results:?}");
    let d1 = results[0].output.as_ref().unwrap();
    assert_eq!(d1["chunks"]["count"], 2);
    assert_eq!(d1["chunks"]["succeeded"], 2);
    // Inside, `item` is the chunk and `parent` the document.
    assert_eq!(
        d1["chunks"]["results"],
        "- #0: re: note on a of d1\n- #1: re: note on b of d1\n"
    );
    assert_eq!(
        d1["sum"]["text"],
        "re: sum of 2: - #0: re: note on a of d1\n- #1: re: note on b of d1\n"
    );
    // A document's spending includes its chunks' (what a resumed batch counts).
    // (By item: the two documents run at once and either may finish first.)
    let mut spent: Vec<(u32, Value)> = run_events(&store, id)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::BranchCompleted {
                path,
                index,
                output,
            } if path.depth() == 1 => Some((index, output.to_json()["spent"]["tokens"].clone())),
            _ => None,
        })
        .collect();
    spent.sort_by_key(|(index, _)| *index);
    let spent: Vec<Value> = spent.into_iter().map(|(_, v)| v).collect();
    assert_eq!(spent, [json!(360), json!(240)]);

    // The items must have the field the inner for_each runs over (checked before the run).
    let err = spec.input(lines(&[json!({"id": "d3"})]), &[]).unwrap_err();
    assert!(err.contains("chunks"), "{err}");

    // An item whose field is not an array fails that item, naming the field.
    let (_sd2, store2) = self::store();
    let env = FlowEnv::new().model("m", model.clone());
    let spec = load_env(
        &NESTED.replace("key = \"id\"", "key = \"id\"\nmin_required = 1"),
        &env,
    )
    .unwrap();
    let items = [
        json!({"id": "d1", "chunks": ["a"]}),
        json!({"id": "d2", "chunks": "not a list"}),
    ];
    let out = run_to_end(&store2, env, &spec, &items).await;
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    let id: RunId = out.run_id.parse().unwrap();
    let results = follow_all(&store2, id).await;
    let failed = results.iter().find(|r| !r.ok).expect("d2 fails");
    assert!(
        failed
            .error
            .as_deref()
            .unwrap()
            .contains("`item.chunks` is not an array (it is a string)"),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_resumed_nested_for_each_does_not_call_the_model_again_for_finished_chunks() {
    let items = [
        json!({"id": "d1", "chunks": ["a", "b", "c"]}),
        json!({"id": "d2", "chunks": ["d", "e"]}),
    ];
    let text = NESTED.replace("key = \"id\"", "key = \"id\"\nconcurrency = 1");
    // Reference: uninterrupted.
    let (_sd0, store0) = store();
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let env = FlowEnv::new().model("m", model.clone());
    let spec = load_env(&text, &env).unwrap();
    let want = run_to_end(&store0, env, &spec, &items).await;
    assert_eq!(want.status, RunStatus::Completed);
    assert_eq!(model.calls(), 7, "5 notes and 2 sums");

    // Three calls answered (d1's three notes, two at a time), then every call hangs (d1's
    // sum); stop, and resume with a working model.
    let (_sd, store) = store();
    let gated = Gated::new(3);
    let env = FlowEnv::new().model("m", gated.clone());
    let spec = load_env(&text, &env).unwrap();
    let input = spec.input(lines(&items), &[]).unwrap();
    let e = engine(&store, env);
    let h = e
        .start_with(spec.start_options(&input).unwrap())
        .await
        .unwrap();
    let id = h.id;
    tokio::time::timeout(Duration::from_secs(20), async {
        while gated.calls.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("three calls answered, one hanging");
    // Let the answered calls' records land.
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.shutdown();
    assert_eq!(h.wait().await.unwrap().status, RunStatus::Running);
    let model = Arc::new(ScriptedModel::from_fn(|req| {
        Ok(say(&format!("answer to {}", last_user(req))))
    }));
    let out = engine(&store, FlowEnv::new().model("m", model.clone()))
        .resume(id)
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(out.status, RunStatus::Completed, "{:?}", out.error);
    assert_eq!(
        out.output, want.output,
        "the same output as an uninterrupted run"
    );
    assert_eq!(
        model.calls(),
        4,
        "only the 4 calls not answered before the stop"
    );
}
