//! The drift check: answers of the API validated against the schemas of
//! docs/openapi.yaml with a JSON Schema validator. Shared by the unit tests
//! (api::tests) and the end-to-end tests (tests/it/api.rs), which include
//! this file by path.
//!
//! The document's response objects say `additionalProperties: false`, so
//! a field added to a report fails these checks until the document has it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use yaml_rust2::{Yaml, YamlLoader};

/// docs/openapi.yaml, as JSON.
pub struct Document {
    doc: Value,
}

/// A YAML value as JSON (the document uses plain scalars, lists and maps).
fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(r) => json!(r.parse::<f64>().unwrap_or_else(|e| panic!("bad number {r}: {e}"))),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("a map key that is not a string: {other:?}"),
                };
                m.insert(key, to_json(v));
            }
            Value::Object(m)
        }
        other => panic!("unexpected YAML in docs/openapi.yaml: {other:?}"),
    }
}

impl Document {
    /// The repository's docs/openapi.yaml.
    pub fn load() -> Document {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Document::parse(&text)
    }

    /// A document from its YAML text.
    pub fn parse(text: &str) -> Document {
        let mut docs = YamlLoader::load_from_str(text).expect("docs/openapi.yaml is not YAML");
        Document {
            doc: to_json(&docs.remove(0)),
        }
    }

    /// Every documented (METHOD, path).
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("no paths") {
            for method in item.as_object().expect("a path item").keys() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
        ops
    }

    /// Follow a local `$ref` (`#/components/...`) if `v` is one.
    fn deref<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("not a local $ref: {r}"));
                self.doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("no {r} in the document"))
            }
            None => v,
        }
    }

    /// Validate `instance` against `schema`, whose `$ref`s point into this
    /// document's components.
    fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let mut root = schema.clone();
        let obj = root.as_object_mut().ok_or("a schema that is not an object")?;
        obj.insert("components".into(), self.doc["components"].clone());
        obj.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        let validator = jsonschema::validator_for(&root).map_err(|e| format!("bad schema: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("at '{}': {e}", e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Validate `value` against `#/components/schemas/NAME`.
    pub fn check_schema(&self, name: &str, value: &Value) -> Result<(), String> {
        self.validate(&json!({ "$ref": format!("#/components/schemas/{name}") }), value)
            .map_err(|e| format!("{name}: {e}"))
    }

    /// Validate an answer to `METHOD path`: its status must be documented
    /// for the operation, and its body must match the schema of its media
    /// type (`application/json` or `text/plain`).
    pub fn check(&self, method: &str, path: &str, status: u16, content_type: &str, body: &[u8]) -> Result<(), String> {
        let what = format!("{method} {path} -> {status}");
        let op = self.doc["paths"]
            .get(path)
            .and_then(|item| item.get(method.to_lowercase()))
            .ok_or_else(|| format!("{what}: not a documented operation"))?;
        let response = op["responses"]
            .get(status.to_string())
            .ok_or_else(|| format!("{what}: status {status} is not documented for the operation"))?;
        let media = content_type.split(';').next().unwrap_or("").trim();
        let schema = self.deref(response)["content"]
            .get(media)
            .map(|c| &c["schema"])
            .ok_or_else(|| format!("{what}: media type '{media}' is not documented"))?;
        let instance = if media == "application/json" {
            serde_json::from_slice(body).map_err(|e| format!("{what}: not JSON: {e}"))?
        } else {
            Value::String(String::from_utf8(body.to_vec()).map_err(|e| format!("{what}: not UTF-8: {e}"))?)
        };
        self.validate(schema, &instance).map_err(|e| format!("{what}: {e}"))
    }
}
