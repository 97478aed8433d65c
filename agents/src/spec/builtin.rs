//! The tools a workflow file can declare without Rust: an HTTP request under a base URL, reading
//! a file under a root folder, running a program from an allow-list, and extracting fields from
//! JSON. Each has a limit on time and bytes; over a limit is an error sent back to the model,
//! never a silently truncated answer.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_storage::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::validate::{ToolDef, ToolKind};
use crate::tools::{Tool, ToolError};

/// Builds the tool `name` declared as `def`; relative paths are relative to `base_dir`.
pub(crate) fn build(name: &str, def: &ToolDef, base_dir: &Path) -> Result<Arc<dyn Tool>, String> {
    let timeout = Duration::from_secs(def.timeout_secs);
    let common = Common {
        name: name.to_string(),
        description: def
            .description
            .clone()
            .unwrap_or_else(|| default_description(def)),
        max_bytes: def.max_bytes,
        timeout,
        idempotent: !def.at_most_once,
    };
    Ok(match def.kind {
        ToolKind::Http => {
            let base = def.base_url.clone().unwrap_or_default();
            let base = reqwest::Url::parse(&base)
                .map_err(|e| format!("tool `{name}`: base_url `{base}` is not a URL: {e}"))?;
            crate::http::install_crypto_provider();
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| format!("tool `{name}`: cannot build an HTTP client: {e}"))?;
            Arc::new(Http {
                common,
                base,
                methods: def.methods.clone(),
                headers: def.headers.clone().into_iter().collect(),
                client,
            })
        }
        ToolKind::ReadFile => {
            let root = base_dir.join(def.root.clone().unwrap_or_default());
            Arc::new(ReadFile { common, root })
        }
        ToolKind::Command => Arc::new(Command {
            common,
            allow: def.allow.clone(),
            dir: base_dir.to_path_buf(),
        }),
        ToolKind::ExtractJson => Arc::new(ExtractJson { common }),
    })
}

fn default_description(def: &ToolDef) -> String {
    match def.kind {
        ToolKind::Http => format!(
            "HTTP request under {} (methods: {}). Arguments: path (appended to the base URL), optional method, query and JSON body.",
            def.base_url.as_deref().unwrap_or(""),
            def.methods.join(", ")
        ),
        ToolKind::ReadFile => {
            "Reads a UTF-8 text file by its path relative to the tool's root folder.".into()
        }
        ToolKind::Command => format!(
            "Runs one of these programs with arguments (no shell): {}.",
            def.allow.join(", ")
        ),
        ToolKind::ExtractJson => {
            "Extracts fields (dotted paths such as `order.items.0.sku`) from a JSON document."
                .into()
        }
    }
}

struct Common {
    name: String,
    description: String,
    max_bytes: u64,
    timeout: Duration,
    idempotent: bool,
}

fn args<T: for<'de> Deserialize<'de>>(name: &str, input: Value) -> Result<T, ToolError> {
    serde_json::from_value(input).map_err(|e| ToolError(format!("bad arguments for `{name}`: {e}")))
}

macro_rules! tool_common {
    () => {
        fn name(&self) -> &str {
            &self.common.name
        }
        fn description(&self) -> &str {
            &self.common.description
        }
        fn idempotent(&self) -> bool {
            self.common.idempotent
        }
    };
}

struct Http {
    common: Common,
    base: reqwest::Url,
    methods: Vec<String>,
    headers: Vec<(String, String)>,
    client: reqwest::Client,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpArgs {
    path: String,
    method: Option<String>,
    #[serde(default)]
    query: std::collections::BTreeMap<String, String>,
    body: Option<Value>,
}

impl Http {
    /// The URL for `path`, refusing anything that leaves the base URL.
    fn url(&self, path: &str) -> Result<reqwest::Url, ToolError> {
        let joined = format!(
            "{}/{}",
            self.base.as_str().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        let url = reqwest::Url::parse(&joined)
            .map_err(|e| ToolError(format!("`{path}` does not make a URL: {e}")))?;
        let same_origin = url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default();
        if !same_origin || !url.path().starts_with(self.base.path()) || path.contains("..") {
            return Err(ToolError(format!(
                "`{path}` leaves {}; this tool only reaches URLs under it",
                self.base
            )));
        }
        Ok(url)
    }

    async fn call_http(&self, input: Value) -> Result<Value, ToolError> {
        let a: HttpArgs = args(&self.common.name, input)?;
        let method = a
            .method
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase();
        if !self.methods.contains(&method) {
            return Err(ToolError(format!(
                "method {method} is not allowed (allowed: {})",
                self.methods.join(", ")
            )));
        }
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| ToolError(format!("method {method}: {e}")))?;
        let mut url = self.url(&a.path)?;
        if !a.query.is_empty() {
            url.query_pairs_mut().extend_pairs(a.query.iter());
        }
        let mut req = self.client.request(m, url.clone());
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(b) = &a.body {
            req = req.json(b);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| ToolError(format!("{method} {url}: {e}")))?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| ToolError(format!("{method} {url}: reading the body: {e}")))?
        {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > self.common.max_bytes {
                return Err(ToolError(format!(
                    "{method} {url}: the response is over the tool's limit of {} bytes",
                    self.common.max_bytes
                )));
            }
        }
        let body = match serde_json::from_slice::<Value>(&body) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
        };
        Ok(json!({ "status": status, "body": body }))
    }
}

impl Tool for Http {
    tool_common!();

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Path under the base URL"},
                "method": {"type": "string", "enum": self.methods},
                "query": {"type": "object", "additionalProperties": {"type": "string"}},
                "body": {"description": "JSON body"}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn call(&self, input: Value) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(self.call_http(input))
    }
}

struct ReadFile {
    common: Common,
    root: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathArgs {
    path: String,
}

impl ReadFile {
    async fn read(&self, input: Value) -> Result<Value, ToolError> {
        let a: PathArgs = args(&self.common.name, input)?;
        let rel = Path::new(&a.path);
        if rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(ToolError(format!(
                "`{}`: give a path relative to the tool's root, without `..`",
                a.path
            )));
        }
        let root = tokio::fs::canonicalize(&self.root).await.map_err(|e| {
            ToolError(format!(
                "the tool's root {} is unreadable: {e}",
                self.root.display()
            ))
        })?;
        let full = tokio::fs::canonicalize(root.join(rel))
            .await
            .map_err(|e| ToolError(format!("`{}`: {e}", a.path)))?;
        if !full.starts_with(&root) {
            return Err(ToolError(format!(
                "`{}` leaves the tool's root (a link?)",
                a.path
            )));
        }
        let meta = tokio::fs::metadata(&full)
            .await
            .map_err(|e| ToolError(format!("`{}`: {e}", a.path)))?;
        if meta.len() > self.common.max_bytes {
            return Err(ToolError(format!(
                "`{}` is {} bytes, over the tool's limit of {}",
                a.path,
                meta.len(),
                self.common.max_bytes
            )));
        }
        let bytes = tokio::fs::read(&full)
            .await
            .map_err(|e| ToolError(format!("`{}`: {e}", a.path)))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ToolError(format!("`{}` is not UTF-8 text", a.path)))?;
        Ok(json!({ "path": a.path, "content": text }))
    }
}

impl Tool for ReadFile {
    tool_common!();

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"path": {"type": "string", "description": "Path relative to the root folder"}},
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn call(&self, input: Value) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(self.read(input))
    }
}

struct Command {
    common: Common,
    allow: Vec<String>,
    dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandArgs {
    command: String,
    #[serde(default)]
    args: Vec<String>,
}

impl Command {
    async fn run(&self, input: Value) -> Result<Value, ToolError> {
        let a: CommandArgs = args(&self.common.name, input)?;
        if !self.allow.contains(&a.command) {
            return Err(ToolError(format!(
                "`{}` is not allowed; this tool runs only: {}",
                a.command,
                self.allow.join(", ")
            )));
        }
        let child = tokio::process::Command::new(&a.command)
            .args(&a.args)
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.common.timeout, child)
            .await
            .map_err(|_| {
                ToolError(format!(
                    "`{}` did not finish within {} s and was killed",
                    a.command,
                    self.common.timeout.as_secs()
                ))
            })?
            .map_err(|e| ToolError(format!("cannot run `{}`: {e}", a.command)))?;
        let size = (out.stdout.len() + out.stderr.len()) as u64;
        if size > self.common.max_bytes {
            return Err(ToolError(format!(
                "`{}` wrote {size} bytes, over the tool's limit of {}",
                a.command, self.common.max_bytes
            )));
        }
        Ok(json!({
            "exit_code": out.status.code(),
            "stdout": String::from_utf8_lossy(&out.stdout),
            "stderr": String::from_utf8_lossy(&out.stderr),
        }))
    }
}

impl Tool for Command {
    tool_common!();

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "command": {"type": "string", "enum": self.allow},
                "args": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["command"],
            "additionalProperties": false
        })
    }

    fn call(&self, input: Value) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(self.run(input))
    }
}

struct ExtractJson {
    common: Common,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtractArgs {
    json: Value,
    fields: Vec<String>,
}

/// The value at a dotted path (`a.b.0.c`), if there is one.
pub(crate) fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| match v {
        Value::Object(m) => m.get(k),
        Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

impl ExtractJson {
    fn extract(&self, input: Value) -> Result<Value, ToolError> {
        let a: ExtractArgs = args(&self.common.name, input)?;
        let doc = match a.json {
            Value::String(s) => serde_json::from_str(&s)
                .map_err(|e| ToolError(format!("`json` is a string but not JSON: {e}")))?,
            v => v,
        };
        let mut out = serde_json::Map::new();
        for f in a.fields {
            let v = lookup(&doc, &f).cloned().unwrap_or(Value::Null);
            out.insert(f, v);
        }
        Ok(Value::Object(out))
    }
}

impl Tool for ExtractJson {
    tool_common!();

    fn input_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "json": {"description": "A JSON document, or a string holding one"},
                "fields": {"type": "array", "items": {"type": "string"}, "description": "Dotted paths"}
            },
            "required": ["json", "fields"],
            "additionalProperties": false
        })
    }

    fn call(&self, input: Value) -> BoxFuture<'_, Result<Value, ToolError>> {
        let r = self.extract(input);
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(kind: ToolKind) -> ToolDef {
        ToolDef {
            kind,
            description: None,
            base_url: Some("http://127.0.0.1:9/api".into()),
            methods: vec!["GET".into()],
            headers: Default::default(),
            root: Some(".".into()),
            allow: vec!["echo".into()],
            timeout_secs: 5,
            max_bytes: 64,
            at_most_once: false,
        }
    }

    #[tokio::test]
    async fn extract_json_reads_dotted_paths_from_text_or_objects() {
        let t = build("x", &def(ToolKind::ExtractJson), Path::new(".")).unwrap();
        let out = t
            .call(
                json!({"json": "{\"a\": {\"b\": [1, {\"c\": 2}]}}", "fields": ["a.b.1.c", "a.z"]}),
            )
            .await
            .unwrap();
        assert_eq!(out, json!({"a.b.1.c": 2, "a.z": null}));
    }

    #[tokio::test]
    async fn read_file_stays_under_its_root_and_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello").unwrap();
        std::fs::write(dir.path().join("big.txt"), "x".repeat(100)).unwrap();
        let t = build("files", &def(ToolKind::ReadFile), dir.path()).unwrap();
        assert_eq!(
            t.call(json!({"path": "a.txt"})).await.unwrap()["content"],
            "hello"
        );
        let e = t.call(json!({"path": "../etc/passwd"})).await.unwrap_err();
        assert!(e.0.contains("without `..`"), "{e}");
        let e = t.call(json!({"path": "big.txt"})).await.unwrap_err();
        assert!(e.0.contains("over the tool's limit of 64"), "{e}");
    }

    #[tokio::test]
    async fn command_runs_only_allowed_programs() {
        let t = build("cmd", &def(ToolKind::Command), Path::new(".")).unwrap();
        let out = t
            .call(json!({"command": "echo", "args": ["hi"]}))
            .await
            .unwrap();
        assert_eq!(out["stdout"], "hi\n");
        assert_eq!(out["exit_code"], 0);
        let e = t
            .call(json!({"command": "rm", "args": ["-rf", "/"]}))
            .await
            .unwrap_err();
        assert!(e.0.contains("not allowed"), "{e}");
    }

    #[test]
    fn http_refuses_urls_outside_its_base() {
        let d = def(ToolKind::Http);
        let base = reqwest::Url::parse(d.base_url.as_deref().unwrap()).unwrap();
        let h = Http {
            common: Common {
                name: "h".into(),
                description: String::new(),
                max_bytes: 10,
                timeout: Duration::from_secs(1),
                idempotent: true,
            },
            base,
            methods: vec!["GET".into()],
            headers: vec![],
            client: {
                crate::http::install_crypto_provider();
                reqwest::Client::new()
            },
        };
        assert_eq!(
            h.url("/orders/7").unwrap().as_str(),
            "http://127.0.0.1:9/api/orders/7"
        );
        assert!(h.url("../admin").is_err());
        assert!(
            h.url("@evil.example/x").is_err()
                || h.url("@evil.example/x").unwrap().host_str() == Some("127.0.0.1")
        );
    }
}
