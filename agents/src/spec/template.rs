//! Prompt templates: text with `{{ name.path }}` references, parsed and checked when the
//! workflow file is loaded and filled when a step runs.
//!
//! Hand-written rather than a template engine (minijinja, tera): the only feature needed is
//! substitution, and every reference must be checked against the file's declared names before
//! anything runs, with the file's line; a general engine resolves names only at render time.

use serde_json::Value;

/// Longest template accepted, in bytes (a prompt, not a document).
pub(crate) const TEMPLATE_BYTES_MAX: usize = 256 * 1024;

/// A parsed template.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    /// A reference: `item.subject` is `["item", "subject"]`; with its byte offset in the text.
    Var(Vec<String>, usize),
}

impl Template {
    /// A template with no text (stands in where validation already reported a problem).
    pub(crate) fn empty() -> Template {
        Template { parts: Vec::new() }
    }

    /// Parses `text`; the error names the problem and its byte offset in `text`.
    pub(crate) fn parse(text: &str) -> Result<Template, (usize, String)> {
        if text.len() > TEMPLATE_BYTES_MAX {
            return Err((
                0,
                format!(
                    "the template is {} bytes; the limit is {TEMPLATE_BYTES_MAX}: put large text in an item or a file tool",
                    text.len()
                ),
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err((
                    offset + open,
                    "`{{` is never closed: write `{{ name }}` (a literal `{{` cannot appear in a prompt)".into(),
                ));
            };
            let inner = after[..close].trim();
            let path: Vec<String> = inner.split('.').map(|s| s.trim().to_string()).collect();
            if inner.is_empty()
                || path.iter().any(|p| {
                    p.is_empty()
                        || !p
                            .chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                })
            {
                return Err((
                    offset + open,
                    format!(
                        "`{{{{{}}}}}` is not a reference: use names joined by dots, e.g. `{{{{ item.subject }}}}`",
                        &after[..close]
                    ),
                ));
            }
            parts.push(Part::Var(path, offset + open));
            let consumed = open + 2 + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The references, with their byte offsets in the template's text.
    pub(crate) fn vars(&self) -> impl Iterator<Item = (&[String], usize)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v, at) => Some((v.as_slice(), *at)),
            Part::Text(_) => None,
        })
    }

    /// Fills the template from `scope` (an object: `item`, `input`, `steps`). A string is
    /// inserted as it is, any other value as compact JSON; a missing value is an error.
    pub(crate) fn render(&self, scope: &Value) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(path, _) => {
                    let mut v = scope;
                    for (i, key) in path.iter().enumerate() {
                        let next = match v {
                            Value::Object(m) => m.get(key),
                            Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
                            _ => None,
                        };
                        v = next.ok_or_else(|| {
                            format!(
                                "`{{{{ {} }}}}`: `{}` has no `{key}`",
                                path.join("."),
                                path[..i.max(1)].join(".")
                            )
                        })?;
                    }
                    match v {
                        Value::String(s) => out.push_str(s),
                        Value::Null => {}
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_filled_from_the_scope() {
        let t =
            Template::parse("Ticket {{ item.id }}: {{item.subject}} ({{ input.tone }}) {{item.n}}")
                .unwrap();
        let vars: Vec<String> = t.vars().map(|(v, _)| v.join(".")).collect();
        assert_eq!(vars, ["item.id", "item.subject", "input.tone", "item.n"]);
        let s = t
            .render(&json!({"item": {"id": "T-1", "subject": "refund", "n": 3}, "input": {"tone": "warm"}}))
            .unwrap();
        assert_eq!(s, "Ticket T-1: refund (warm) 3");
    }

    #[test]
    fn a_missing_value_is_an_error_naming_it() {
        let t = Template::parse("{{ item.subject }}").unwrap();
        let e = t.render(&json!({"item": {"id": 1}})).unwrap_err();
        assert!(
            e.contains("item.subject") && e.contains("no `subject`"),
            "{e}"
        );
    }

    #[test]
    fn malformed_references_are_refused_with_their_offset() {
        assert_eq!(Template::parse("ab {{ item.x").unwrap_err().0, 3);
        assert!(Template::parse("{{ }}").is_err());
        assert!(Template::parse("{{ item..x }}").is_err());
        assert!(Template::parse("{{ item x }}").is_err());
    }
}
