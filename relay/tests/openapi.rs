//! `openapi.json` describes exactly the server's routes: the same
//! `(method, path)` set as `server::ROUTES`, for each route the same
//! success statuses and error `(status, reason)` pairs as the server can
//! answer (`server::route_responses`), the reasons of `server::REASONS`
//! with their statuses, and binary bodies as `application/octet-stream`
//! with `format: binary`.

use std::collections::BTreeSet;

use cubbyhole_relay::server::{route_responses, REASONS, ROUTES};
use serde_json::Value;

fn spec() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let text = std::fs::read_to_string(path).expect("relay/openapi.json");
    serde_json::from_str(&text).expect("openapi.json is JSON")
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// `(METHOD, path, operation)` for every documented operation.
fn operations(spec: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                out.push((method.to_ascii_uppercase(), path.clone(), operation));
            }
        }
    }
    out
}

/// Follows a local `$ref`.
fn resolve<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("local $ref");
            resolve(spec, spec.pointer(pointer).expect("$ref target exists"))
        }
        None => value,
    }
}

#[test]
fn is_openapi_3_0() {
    let spec = spec();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.0."));
    assert!(spec["info"]["title"].is_string());
    assert!(spec["info"]["version"].is_string());
}

#[test]
fn documents_exactly_the_route_table() {
    let spec = spec();
    let documented: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(ROUTES.len(), served.len(), "no duplicate routes");
    assert_eq!(documented, served);
}

#[test]
fn documents_exactly_the_answers_of_each_route() {
    let spec = spec();
    for (method, path, operation) in operations(&spec) {
        let served: BTreeSet<(u16, Option<String>)> = route_responses(&method, &path)
            .unwrap_or_else(|| panic!("{method} {path} is not served"))
            .into_iter()
            .map(|(s, r)| (s, r.map(str::to_owned)))
            .collect();
        let mut documented = BTreeSet::new();
        for (status, response) in operation["responses"].as_object().expect("responses") {
            let status: u16 = status
                .parse()
                .unwrap_or_else(|_| panic!("{method} {path}: status {status}"));
            let response = resolve(&spec, response);
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}: description"
            );
            match response.get("x-reasons") {
                None => {
                    assert!(
                        (200..300).contains(&status),
                        "{method} {path} {status}: an error response needs x-reasons"
                    );
                    documented.insert((status, None));
                }
                Some(reasons) => {
                    let schema = resolve(&spec, &response["content"]["application/json"]["schema"]);
                    assert_eq!(
                        schema,
                        resolve(&spec, &spec["components"]["schemas"]["Error"]),
                        "{method} {path} {status}: the error schema"
                    );
                    for reason in reasons.as_array().expect("x-reasons array") {
                        documented.insert((status, Some(reason.as_str().unwrap().to_owned())));
                    }
                }
            }
        }
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unproducible: Vec<_> = documented.difference(&served).collect();
        assert!(
            unproducible.is_empty(),
            "{method} {path}: documented but never answered: {unproducible:?}"
        );
        assert!(
            undocumented.is_empty(),
            "{method} {path}: answered but not documented: {undocumented:?}"
        );
    }
}

#[test]
fn documents_every_reason_with_its_status() {
    let spec = spec();
    let enumerated: BTreeSet<&str> = spec["components"]["schemas"]["Error"]["properties"]["error"]
        ["enum"]
        .as_array()
        .expect("error enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let reasons: BTreeSet<&str> = REASONS.iter().map(|(name, _)| *name).collect();
    assert_eq!(enumerated, reasons);

    // Every reason is reachable: per route, or from any request.
    let mut reachable: BTreeSet<String> = spec["x-global-reasons"]
        .as_array()
        .expect("x-global-reasons")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for (method, path) in ROUTES {
        for (status, reason) in route_responses(method, path).unwrap() {
            if let Some(reason) = reason {
                let expected = REASONS.iter().find(|(name, _)| *name == reason).unwrap().1;
                assert_eq!(status, expected, "{reason}");
                reachable.insert(reason.to_owned());
            }
        }
    }
    assert_eq!(
        reachable,
        reasons
            .iter()
            .map(|r| r.to_string())
            .collect::<BTreeSet<_>>()
    );
}

#[test]
fn binary_bodies_are_octet_streams() {
    let spec = spec();
    let mut binary = 0;
    for (method, path, operation) in operations(&spec) {
        let mut contents = Vec::new();
        if let Some(body) = operation.get("requestBody") {
            contents.push(&resolve(&spec, body)["content"]);
        }
        for response in operation["responses"].as_object().unwrap().values() {
            if let Some(content) = resolve(&spec, response).get("content") {
                contents.push(content);
            }
        }
        for content in contents {
            if let Some(media) = content.get("application/octet-stream") {
                let schema = resolve(&spec, &media["schema"]);
                assert_eq!(schema["type"], "string", "{method} {path}");
                assert_eq!(schema["format"], "binary", "{method} {path}");
                binary += 1;
            }
        }
    }
    // publish, deposit, fetch, acknowledge, device-list bodies; bundle,
    // challenge, fetch, device-lists answers.
    assert_eq!(binary, 9);
}

#[test]
fn declares_every_path_parameter() {
    let spec = spec();
    for (method, path, operation) in operations(&spec) {
        let declared: BTreeSet<String> = operation
            .get("parameters")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .map(|p| resolve(&spec, p))
                    .filter(|p| p["in"] == "path")
                    .map(|p| {
                        assert_eq!(p["required"], true);
                        p["name"].as_str().unwrap().to_owned()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let templated: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(str::to_owned)
            .collect();
        assert_eq!(declared, templated, "{method} {path}");
    }
}
