//! The deployment files in `deploy/` (Dockerfile, compose, Kubernetes, systemd) against the
//! real binaries: every YAML file parses, every Kubernetes object is complete and hardened,
//! every flag the files pass exists in `--help`, every file they mount exists, and the
//! ConfigMaps' config.toml load with the broker's own config loader. And `govshare-broker
//! health`, which the container health check and the Kubernetes probes run, against real brokers.
//!
//! Schema validation proper is in `.ci/run`: kubernetes-validate on the kustomize-rendered
//! overlays, `docker-compose config`, BuildKit's Dockerfile parser, `systemd-analyze verify`.
//! The YAML reader here is small (block mappings and sequences, flow sequences and mappings,
//! block scalars, quoted scalars, anchors, aliases and `<<` merges): enough for these files, and
//! strict, so that a file it cannot read fails the test rather than passing unread.

use anyhow::{bail, ensure, Context, Result};
use govshare_tests::TestBroker;
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

// ---- a small, strict YAML reader ------------------------------------------------------------

/// One significant line: indentation, text without the indentation, 1-based line number.
#[derive(Debug, Clone)]
struct Line {
    indent: usize,
    text: String,
    no: usize,
}

struct Yaml<'a> {
    raw: Vec<&'a str>,
    lines: Vec<Line>,
    /// For each significant line, its index in `raw` (block scalars read raw lines).
    raw_index: Vec<usize>,
    pos: usize,
    anchors: HashMap<String, Value>,
}

/// Parses a YAML stream into its documents.
fn parse_yaml(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push(current);
    let mut out = Vec::new();
    for d in docs {
        if d.lines().all(is_insignificant) {
            continue;
        }
        out.push(parse_document(&d)?);
    }
    Ok(out)
}

fn is_insignificant(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn parse_document(text: &str) -> Result<Value> {
    let raw: Vec<&str> = text.lines().collect();
    let mut lines = Vec::new();
    let mut raw_index = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        if is_insignificant(l) {
            continue;
        }
        let indent = l.len() - l.trim_start_matches(' ').len();
        ensure!(
            !l[indent..].starts_with('\t'),
            "line {}: a tab in the indentation",
            i + 1
        );
        lines.push(Line {
            indent,
            text: l[indent..].trim_end().to_string(),
            no: i + 1,
        });
        raw_index.push(i);
    }
    let mut y = Yaml {
        raw,
        lines,
        raw_index,
        pos: 0,
        anchors: HashMap::new(),
    };
    if y.lines.is_empty() {
        return Ok(Value::Null);
    }
    let indent = y.lines[0].indent;
    let v = y.node(indent)?;
    if let Some(l) = y.lines.get(y.pos) {
        bail!("line {}: unexpected {:?} (bad indentation?)", l.no, l.text);
    }
    Ok(v)
}

fn is_seq_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// The position of the `:` that ends a mapping key, outside quotes and brackets.
fn key_colon(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let (mut quote, mut depth) = (None::<u8>, 0i32);
    for (i, &c) in b.iter().enumerate() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'"') | (None, b'\'') if i == 0 => quote = Some(c),
            (None, b'[') | (None, b'{') => depth += 1,
            (None, b']') | (None, b'}') => depth -= 1,
            (None, b'#') if i > 0 && b[i - 1] == b' ' => return None,
            (None, b':') if depth == 0 && (i + 1 == b.len() || b[i + 1] == b' ') => return Some(i),
            _ => {}
        }
    }
    None
}

/// Removes a trailing ` # comment` outside quotes.
fn strip_comment(text: &str) -> &str {
    let b = text.as_bytes();
    let mut quote = None::<u8>;
    for (i, &c) in b.iter().enumerate() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, b'"') | (None, b'\'') => quote = Some(c),
            (None, b'#') if i == 0 || b[i - 1] == b' ' => return text[..i].trim_end(),
            _ => {}
        }
    }
    text.trim_end()
}

impl Yaml<'_> {
    fn peek(&self) -> Option<&Line> {
        self.lines.get(self.pos)
    }

    /// A block node whose lines are indented by exactly `indent`.
    fn node(&mut self, indent: usize) -> Result<Value> {
        let l = self.peek().context("expected a value")?.clone();
        ensure!(
            l.indent == indent,
            "line {}: indentation {} where {} was expected",
            l.no,
            l.indent,
            indent
        );
        if is_seq_item(&l.text) {
            self.seq(indent)
        } else if key_colon(&l.text).is_some() {
            self.map(indent)
        } else {
            self.pos += 1;
            self.scalar_or_flow(strip_comment(&l.text), l.no)
        }
    }

    fn seq(&mut self, indent: usize) -> Result<Value> {
        let mut items = Vec::new();
        while let Some(l) = self.peek().cloned() {
            ensure!(
                l.indent <= indent,
                "line {}: unexpected {:?} (bad indentation?)",
                l.no,
                l.text
            );
            // Less indented, or a key after a sequence at its key's indentation: the caller's.
            if l.indent < indent || !is_seq_item(&l.text) {
                break;
            }
            let rest = l.text[1..].trim_start();
            if rest.is_empty() || rest.starts_with('#') {
                self.pos += 1;
                items.push(self.child(indent)?);
            } else {
                // `- key: value` or `- scalar`: re-read the item's text as a node of its own,
                // indented to where it starts.
                let offset = l.text.len() - rest.len();
                self.lines[self.pos] = Line {
                    indent: indent + offset,
                    text: rest.to_string(),
                    no: l.no,
                };
                items.push(self.node(indent + offset)?);
            }
        }
        Ok(Value::Array(items))
    }

    /// The value of a key or item whose text ended at the line: the next, deeper block, or null.
    fn child(&mut self, indent: usize) -> Result<Value> {
        match self.peek() {
            Some(n) if n.indent > indent => {
                let i = n.indent;
                self.node(i)
            }
            _ => Ok(Value::Null),
        }
    }

    fn map(&mut self, indent: usize) -> Result<Value> {
        let mut map = Map::new();
        let mut explicit = BTreeSet::new();
        while let Some(l) = self.peek().cloned() {
            if l.indent < indent {
                break;
            }
            ensure!(
                l.indent == indent && !is_seq_item(&l.text),
                "line {}: unexpected {:?} (bad indentation?)",
                l.no,
                l.text
            );
            let colon = key_colon(&l.text)
                .with_context(|| format!("line {}: expected `key: value`: {:?}", l.no, l.text))?;
            let key = unquote(l.text[..colon].trim(), l.no)?;
            let mut rest = strip_comment(l.text[colon + 1..].trim()).to_string();
            self.pos += 1;
            let mut anchor = None;
            if let Some(a) = rest.strip_prefix('&') {
                let (name, after) = a.split_once(' ').unwrap_or((a, ""));
                anchor = Some(name.to_string());
                rest = after.trim().to_string();
            }
            let value = if rest.is_empty() {
                match self.peek() {
                    // A sequence may sit at its key's own indentation.
                    Some(n) if n.indent == indent && is_seq_item(&n.text) => self.seq(indent)?,
                    _ => self.child(indent)?,
                }
            } else if rest.starts_with('|') || rest.starts_with('>') {
                self.block_scalar(&rest, indent, l.no)?
            } else {
                self.scalar_or_flow(&rest, l.no)?
            };
            if let Some(a) = anchor {
                self.anchors.insert(a, value.clone());
            }
            if key == "<<" {
                let Value::Object(merged) = value else {
                    bail!("line {}: `<<` needs a mapping", l.no);
                };
                for (k, v) in merged {
                    if !explicit.contains(&k) {
                        map.insert(k, v);
                    }
                }
                continue;
            }
            ensure!(
                explicit.insert(key.clone()),
                "line {}: duplicate key {key:?}",
                l.no
            );
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }

    /// `|`, `|-`, `>`, `>-`: the raw lines after the key, indented deeper than it.
    fn block_scalar(&mut self, header: &str, indent: usize, no: usize) -> Result<Value> {
        let folded = header.starts_with('>');
        let chomp = header[1..].trim();
        ensure!(
            chomp.is_empty() || chomp == "-",
            "line {no}: unsupported block scalar header {header:?}"
        );
        let start = self.raw_index[self.pos - 1] + 1;
        let mut end = start;
        let mut block_indent = None;
        while end < self.raw.len() {
            let r = self.raw[end];
            if r.trim().is_empty() {
                end += 1;
                continue;
            }
            let ind = r.len() - r.trim_start_matches(' ').len();
            if ind <= indent {
                break;
            }
            block_indent.get_or_insert(ind);
            end += 1;
        }
        let bi = block_indent.unwrap_or(indent + 2);
        let mut lines: Vec<String> = self.raw[start..end]
            .iter()
            .map(|r| r.get(bi..).unwrap_or("").to_string())
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let mut text = if folded {
            lines.join(" ")
        } else {
            lines.join("\n")
        };
        if chomp.is_empty() {
            text.push('\n');
        }
        // Skip the significant lines that belonged to the block.
        while self.pos < self.lines.len() && self.raw_index[self.pos] < end {
            self.pos += 1;
        }
        Ok(Value::String(text))
    }

    fn scalar_or_flow(&self, text: &str, no: usize) -> Result<Value> {
        let t = text.trim();
        if let Some(alias) = t.strip_prefix('*') {
            return self
                .anchors
                .get(alias)
                .cloned()
                .with_context(|| format!("line {no}: unknown alias *{alias}"));
        }
        if t.starts_with('[') || t.starts_with('{') {
            let (v, rest) = flow(t, no)?;
            ensure!(
                rest.trim().is_empty(),
                "line {no}: text after a flow collection: {rest:?}"
            );
            return Ok(v);
        }
        scalar(t, no)
    }
}

/// A flow collection (`[a, "b"]`, `{k: v}`) at the start of `t`, and what follows it.
fn flow(t: &str, no: usize) -> Result<(Value, &str)> {
    let close = if t.starts_with('[') { ']' } else { '}' };
    let mut rest = t[1..].trim_start();
    let mut items = Vec::new();
    let mut map = Map::new();
    loop {
        if let Some(r) = rest.strip_prefix(close) {
            rest = r;
            break;
        }
        let (item, r) = if rest.starts_with('[') || rest.starts_with('{') {
            let (v, r) = flow(rest, no)?;
            (FlowItem::Value(v), r)
        } else {
            let end = flow_token_end(rest, no)?;
            (FlowItem::Text(rest[..end].trim()), &rest[end..])
        };
        if close == ']' {
            items.push(match item {
                FlowItem::Value(v) => v,
                FlowItem::Text(s) => scalar(s, no)?,
            });
        } else {
            let FlowItem::Text(s) = item else {
                bail!("line {no}: a collection as a flow mapping key");
            };
            let (k, v) = s
                .split_once(": ")
                .with_context(|| format!("line {no}: expected `key: value` in {t:?}"))?;
            let key = unquote(k.trim(), no)?;
            ensure!(
                map.insert(key.clone(), scalar(v.trim(), no)?).is_none(),
                "line {no}: duplicate key {key:?}"
            );
        }
        rest = r.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.starts_with(close) {
            bail!("line {no}: expected `,` or `{close}` in {t:?}");
        }
    }
    let v = if close == ']' {
        Value::Array(items)
    } else {
        Value::Object(map)
    };
    Ok((v, rest))
}

enum FlowItem<'a> {
    Value(Value),
    Text(&'a str),
}

/// Where a flow item ends: the next `,`, `]` or `}` outside quotes.
fn flow_token_end(s: &str, no: usize) -> Result<usize> {
    let mut quote = None::<char>;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"') | (None, '\'') => quote = Some(c),
            (None, ',') | (None, ']') | (None, '}') => return Ok(i),
            _ => {}
        }
    }
    bail!("line {no}: unterminated flow collection")
}

fn unquote(s: &str, no: usize) -> Result<String> {
    match scalar(s, no)? {
        Value::String(s) => Ok(s),
        v => Ok(v.to_string()),
    }
}

/// A plain or quoted scalar: strings, integers, floats, booleans, null.
fn scalar(s: &str, no: usize) -> Result<Value> {
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .with_context(|| format!("line {no}: unterminated string {s:?}"))?;
        let json: String = serde_json::from_str(&format!("\"{inner}\""))
            .with_context(|| format!("line {no}: bad double-quoted string {s:?}"))?;
        return Ok(Value::String(json));
    }
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .with_context(|| format!("line {no}: unterminated string {s:?}"))?;
        return Ok(Value::String(inner.replace("''", "'")));
    }
    ensure!(
        !s.starts_with('&') && !s.starts_with('!') && !s.starts_with('%') && !s.starts_with('@'),
        "line {no}: unsupported YAML {s:?}"
    );
    Ok(match s {
        "" | "~" | "null" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = s.parse::<i64>() {
                // 0440 is octal in YAML 1.1, as Kubernetes reads it.
                if s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()) {
                    i64::from_str_radix(s, 8)
                        .map(Value::from)
                        .with_context(|| format!("line {no}: bad octal {s:?}"))?
                } else {
                    Value::from(i)
                }
            } else if let Ok(f) = s.parse::<f64>() {
                serde_json::Number::from_f64(f).map_or(Value::String(s.into()), Value::Number)
            } else {
                Value::String(s.into())
            }
        }
    })
}

#[test]
fn the_yaml_reader_reads_what_the_deploy_files_use() -> Result<()> {
    let docs = parse_yaml(
        "# c\nbase: &b\n  x: 1\n  y: \"two\" # c\nm:\n  <<: *b\n  y: three\nlist:\n- a\n- k: v\n  k2: [1, \"x, y\", {p: 7443}]\nblock: |\n  one\n\n  two\nnext: 0440\n---\nk: 'it''s'\n",
    )?;
    ensure!(docs.len() == 2);
    let d = &docs[0];
    ensure!(d["m"]["x"] == 1 && d["m"]["y"] == "three", "{d}");
    ensure!(
        d["list"][0] == "a" && d["list"][1]["k2"][1] == "x, y",
        "{d}"
    );
    ensure!(d["list"][1]["k2"][2]["p"] == 7443, "{d}");
    ensure!(d["block"] == "one\n\ntwo\n", "{d}");
    ensure!(d["next"] == 288, "{d}");
    ensure!(docs[1]["k"] == "it's");
    for bad in [
        "a: 1\na: 2\n",
        "a:\n  b: 1\n c: 2\n",
        "a: [1, 2\n",
        "a: *nope\n",
        "a: \"open\n",
    ] {
        ensure!(parse_yaml(bad).is_err(), "accepted {bad:?}");
    }
    Ok(())
}

// ---- helpers ------------------------------------------------------------------------------

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn yaml_file(path: &Path) -> Result<Vec<Value>> {
    parse_yaml(&read(path)?).with_context(|| format!("{}", path.display()))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`.
fn files_under(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if exts
                .iter()
                .any(|x| p.to_string_lossy().ends_with(&format!(".{x}")))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The long flags (`--data-dir`, ...) that `govshare-broker SUB --help` lists.
fn help_flags(sub: &str) -> Result<BTreeSet<String>> {
    let bin = govshare_tests::bin_path("govshare-broker")?;
    let out = std::process::Command::new(&bin)
        .args([sub, "--help"])
        .output()?;
    ensure!(out.status.success(), "{sub} --help failed");
    let text = String::from_utf8(out.stdout)?;
    let flags: BTreeSet<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    ensure!(flags.contains("--help"), "no flags in {sub} --help");
    Ok(flags)
}

/// The `--flags` of a command line (its words), each checked against `known`.
fn check_flags(what: &str, words: &[String], known: &BTreeSet<String>) -> Result<()> {
    for w in words {
        if w.starts_with("--") {
            let flag = w.split('=').next().unwrap_or(w);
            ensure!(
                known.contains(flag),
                "{what}: {flag} is not a flag of this subcommand (known: {known:?})"
            );
        }
    }
    Ok(())
}

fn strings(v: &Value) -> Result<Vec<String>> {
    v.as_array()
        .with_context(|| format!("expected a list of strings: {v}"))?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_string)
                .with_context(|| format!("expected a string: {s}"))
        })
        .collect()
}

/// The value after `flag` in a command line.
fn flag_value<'a>(words: &'a [String], flag: &str) -> Option<&'a str> {
    words
        .iter()
        .position(|w| w == flag)
        .and_then(|i| words.get(i + 1))
        .map(String::as_str)
}

// ---- Kubernetes ----------------------------------------------------------------------------

/// The kustomize directories: base and every overlay.
fn kustomize_dirs() -> Result<Vec<PathBuf>> {
    let mut dirs = vec![govshare_tests::deploy("k8s/base")];
    for e in std::fs::read_dir(govshare_tests::deploy("k8s/overlays"))? {
        let p = e?.path();
        if p.is_dir() {
            dirs.push(p);
        }
    }
    ensure!(dirs.len() >= 3, "expected base and two overlays: {dirs:?}");
    Ok(dirs)
}

/// The objects of a kustomize directory's own resources (not those of bases it includes).
fn own_resources(dir: &Path) -> Result<Vec<(PathBuf, Value)>> {
    let k = &yaml_file(&dir.join("kustomization.yaml"))?[0];
    let mut out = Vec::new();
    for r in strings(&k["resources"])? {
        let p = dir.join(&r);
        if p.is_file() {
            for doc in yaml_file(&p)? {
                out.push((p.clone(), doc));
            }
        }
    }
    Ok(out)
}

fn base_object(kind: &str) -> Result<Value> {
    own_resources(&govshare_tests::deploy("k8s/base"))?
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind)
        .with_context(|| format!("no {kind} in deploy/k8s/base"))
}

#[test]
fn kustomizations_reference_files_that_exist() -> Result<()> {
    let overlays = govshare_tests::deploy("k8s/overlays");
    let names: BTreeSet<String> = std::fs::read_dir(&overlays)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    for want in ["national", "provincial"] {
        ensure!(names.contains(want), "no overlay {want} in {names:?}");
    }
    for dir in kustomize_dirs()? {
        let k = &yaml_file(&dir.join("kustomization.yaml"))?[0];
        ensure!(
            k["kind"] == "Kustomization",
            "{}: not a Kustomization",
            dir.display()
        );
        for r in strings(&k["resources"])? {
            let p = dir.join(&r);
            ensure!(
                p.is_file() || p.join("kustomization.yaml").is_file(),
                "{}: resource {r} does not exist",
                dir.display()
            );
        }
        if let Some(patches) = k["patches"].as_array() {
            for p in patches {
                if let Some(path) = p["path"].as_str() {
                    ensure!(
                        dir.join(path).is_file(),
                        "{}: patch {path} does not exist",
                        dir.display()
                    );
                } else {
                    let inline = p["patch"]
                        .as_str()
                        .context("a patch with no path or patch")?;
                    parse_yaml(inline)
                        .with_context(|| format!("{}: inline patch", dir.display()))?;
                }
            }
        }
        // Every YAML file in the directory is used.
        for f in files_under(&dir, &["yaml"])? {
            if f.parent() != Some(dir.as_path()) {
                continue;
            }
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let used = name == "kustomization.yaml"
                || strings(&k["resources"])?.iter().any(|r| r == name)
                || k["patches"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["path"] == name));
            ensure!(
                used,
                "{}: not referenced by kustomization.yaml",
                f.display()
            );
        }
    }
    Ok(())
}

#[test]
fn every_kubernetes_object_is_complete() -> Result<()> {
    let mut kinds = BTreeSet::new();
    for f in files_under(&govshare_tests::deploy("k8s"), &["yaml", "yml"])? {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let docs = yaml_file(&f)?;
        ensure!(!docs.is_empty(), "{}: empty", f.display());
        if name == "kustomization.yaml" {
            continue;
        }
        for d in &docs {
            ensure!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{}: no apiVersion or kind",
                f.display()
            );
            ensure!(
                d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty()),
                "{}: no metadata.name",
                f.display()
            );
            if !name.ends_with(".patch.yaml") {
                kinds.insert(d["kind"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    for want in [
        "StatefulSet",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Namespace",
    ] {
        ensure!(kinds.contains(want), "no {want} in deploy/k8s ({kinds:?})");
    }
    Ok(())
}

#[test]
fn the_statefulset_is_hardened_and_probed() -> Result<()> {
    let sts = base_object("StatefulSet")?;
    let spec = &sts["spec"];
    ensure!(spec["replicas"] == 1, "one broker per StatefulSet");
    let pod_labels = &spec["template"]["metadata"]["labels"];
    for (k, v) in spec["selector"]["matchLabels"]
        .as_object()
        .context("selector")?
    {
        ensure!(
            &pod_labels[k] == v,
            "selector {k}={v} does not match the pod"
        );
    }
    let pod = &spec["template"]["spec"];
    let psc = &pod["securityContext"];
    ensure!(psc["runAsNonRoot"] == true, "pod runAsNonRoot");
    ensure!(
        psc["runAsUser"] == 10001,
        "pod runs as the image's uid 10001"
    );
    ensure!(psc["seccompProfile"]["type"] == "RuntimeDefault");
    ensure!(pod["automountServiceAccountToken"] == false);

    let containers = pod["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    ensure!(
        sc["readOnlyRootFilesystem"] == true,
        "readOnlyRootFilesystem"
    );
    ensure!(sc["runAsNonRoot"] == true, "runAsNonRoot");
    ensure!(
        sc["allowPrivilegeEscalation"] == false,
        "allowPrivilegeEscalation"
    );
    ensure!(
        strings(&sc["capabilities"]["drop"])?.contains(&"ALL".to_string()),
        "capabilities.drop ALL"
    );
    for part in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            ensure!(
                c["resources"][part][res].is_string(),
                "resources.{part}.{res}"
            );
        }
    }

    // The command line: `run` with flags that exist.
    let args = strings(&c["args"])?;
    ensure!(args.first().map(String::as_str) == Some("run"), "{args:?}");
    check_flags("StatefulSet args", &args, &help_flags("run")?)?;
    let data_dir = flag_value(&args, "--data-dir").context("--data-dir")?;

    // Probes: `govshare-broker health` with an identity the pod mounts (see the comment in
    // statefulset.yaml: kubelet's native gRPC probe cannot do mutual TLS).
    let health = help_flags("health")?;
    let mounts = c["volumeMounts"].as_array().context("volumeMounts")?;
    let volumes = pod["volumes"].as_array().context("volumes")?;
    let projected_paths = |mount: &str| -> Result<BTreeSet<String>> {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == mount)
            .with_context(|| format!("nothing mounted at {mount}"))?;
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .with_context(|| format!("no volume {}", m["name"]))?;
        let mut paths = BTreeSet::new();
        for s in v["projected"]["sources"].as_array().into_iter().flatten() {
            for src in ["configMap", "secret"] {
                for item in s[src]["items"].as_array().into_iter().flatten() {
                    paths.insert(item["path"].as_str().unwrap_or_default().to_string());
                }
            }
        }
        Ok(paths)
    };
    let etc = projected_paths(data_dir)?;
    ensure!(etc.contains("config.toml"), "{data_dir} has no config.toml");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let p = &c[probe];
        ensure!(p.is_object(), "no {probe}");
        let cmd = strings(&p["exec"]["command"]).with_context(|| format!("{probe}.exec"))?;
        ensure!(
            cmd.get(..2) == Some(&["govshare-broker".to_string(), "health".to_string()][..]),
            "{probe}: {cmd:?}"
        );
        check_flags(probe, &cmd, &health)?;
        let id = flag_value(&cmd, "--identity").context("--identity")?;
        let rel = id
            .strip_prefix(&format!("{data_dir}/"))
            .with_context(|| format!("{probe}: {id} is not in the mounted {data_dir}"))?;
        for f in ["node.pem", "node.key", "ca.pem"] {
            ensure!(
                etc.contains(&format!("{rel}/{f}")),
                "{probe}: {id}/{f} is not mounted"
            );
        }
        let timeout = p["timeoutSeconds"].as_u64().unwrap_or(1);
        ensure!(
            timeout >= 4,
            "{probe}: timeoutSeconds {timeout} leaves no room for health's --timeout"
        );
    }

    // The database on the claim template, where config.toml says.
    let claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .context("volumeClaimTemplates")?;
    let data_mount = mounts
        .iter()
        .find(|m| m["name"] == claim)
        .and_then(|m| m["mountPath"].as_str())
        .context("the claim is not mounted")?;
    let cfg = load_config_map(&base_object("ConfigMap")?)?;
    ensure!(
        cfg.storage.path.starts_with(data_mount),
        "[storage] path {} is not on the claim at {data_mount}",
        cfg.storage.path.display()
    );
    for f in [&cfg.tls.cert, &cfg.tls.key, &cfg.tls.client_ca] {
        let rel = f
            .strip_prefix(data_dir)
            .with_context(|| format!("{} is not under {data_dir}", f.display()))?;
        ensure!(
            etc.contains(&*rel.to_string_lossy()),
            "{} is not mounted",
            f.display()
        );
    }

    // The headless Service, the PDB and the NetworkPolicy select this pod.
    let svc = base_object("Service")?;
    ensure!(
        svc["spec"]["clusterIP"] == "None",
        "the Service is headless"
    );
    ensure!(sts["spec"]["serviceName"] == svc["metadata"]["name"]);
    let ports: BTreeSet<i64> = c["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    ensure!(ports == BTreeSet::from([7443, 9464]), "{ports:?}");
    for (kind, sel) in [
        ("Service", svc["spec"]["selector"].clone()),
        (
            "PodDisruptionBudget",
            base_object("PodDisruptionBudget")?["spec"]["selector"]["matchLabels"].clone(),
        ),
        (
            "NetworkPolicy",
            base_object("NetworkPolicy")?["spec"]["podSelector"]["matchLabels"].clone(),
        ),
    ] {
        let sel = sel
            .as_object()
            .with_context(|| format!("{kind} selector"))?;
        ensure!(!sel.is_empty(), "{kind} selects everything");
        for (k, v) in sel {
            ensure!(
                &pod_labels[k] == v,
                "{kind} selector {k}={v} misses the pod"
            );
        }
    }
    Ok(())
}

/// Loads a ConfigMap's config.toml with the broker's own loader.
fn load_config_map(cm: &Value) -> Result<govshare_broker::config::Config> {
    let toml = cm["data"]["config.toml"]
        .as_str()
        .context("no data.config.toml")?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.toml"), toml)?;
    govshare_broker::config::Config::load(dir.path())
        .with_context(|| format!("config.toml of ConfigMap {}", cm["metadata"]["name"]))
}

#[test]
fn the_overlays_configure_a_hub_and_a_province() -> Result<()> {
    let national = &yaml_file(&govshare_tests::deploy(
        "k8s/overlays/national/config.patch.yaml",
    ))?[0];
    let cfg = load_config_map(national)?;
    ensure!(cfg.broker.id == "000000/hub", "{}", cfg.broker.id);
    ensure!(cfg.federation.parent.is_empty(), "the hub is a root");

    let dir = govshare_tests::deploy("k8s/overlays/provincial");
    let cfg = load_config_map(&yaml_file(&dir.join("config.patch.yaml"))?[0])?;
    ensure!(cfg.broker.id == "330000/hub", "{}", cfg.broker.id);
    let parent = &yaml_file(&dir.join("parent.patch.yaml"))?[0];
    let env = &parent["spec"]["template"]["spec"]["containers"][0]["env"];
    let url = env
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "GOVSHARE_PARENT")
        .and_then(|e| e["value"].as_str())
        .context("the provincial overlay sets no GOVSHARE_PARENT")?;
    ensure!(
        url.starts_with("https://") && url.ends_with(":7443"),
        "{url}"
    );
    // The link identity is mounted where [federation] identity points.
    let k = &yaml_file(&dir.join("kustomization.yaml"))?[0];
    let inline = k["patches"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|p| p["patch"].as_str())
        .context("no inline patch mounting the link identity")?;
    let ops = &parse_yaml(inline)?[0];
    let items = &ops[0]["value"]["secret"]["items"];
    let paths: BTreeSet<&str> = items
        .as_array()
        .context("link items")?
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    let link = cfg
        .federation
        .identity
        .strip_prefix("/etc/govshare")
        .context("[federation] identity is not under the data dir /etc/govshare")?
        .to_string_lossy()
        .into_owned();
    for f in ["node.pem", "node.key", "ca.pem"] {
        ensure!(
            paths.contains(format!("{link}/{f}").as_str()),
            "link/{f} is not mounted: {paths:?}"
        );
    }
    let secret = ops[0]["value"]["secret"]["name"]
        .as_str()
        .unwrap_or_default();
    let resources = own_resources(&dir)?;
    ensure!(
        resources
            .iter()
            .any(|(_, r)| r["kind"] == "Secret" && r["metadata"]["name"] == secret),
        "the overlay does not define Secret {secret}"
    );
    Ok(())
}

// ---- compose ---------------------------------------------------------------------------------

#[test]
fn the_compose_file_is_consistent() -> Result<()> {
    let dir = govshare_tests::deploy("compose");
    let compose = &yaml_file(&dir.join("compose.yaml"))?[0];
    let services = compose["services"].as_object().context("services")?;
    let volumes = compose["volumes"].as_object().context("volumes")?;
    for want in [
        "pki",
        "hub",
        "zhejiang",
        "guangdong",
        "setup",
        "provider",
        "consumer",
        "prometheus",
        "grafana",
    ] {
        ensure!(services.contains_key(want), "no service {want}");
    }
    let demo = read(&dir.join("demo.sh"))?;
    let health = help_flags("health")?;
    let run = help_flags("run")?;
    for (name, s) in services {
        if let Some(b) = s.get("build") {
            let ctx = dir.join(b["context"].as_str().context("build.context")?);
            let df = ctx.join(b["dockerfile"].as_str().context("build.dockerfile")?);
            ensure!(df.is_file(), "{name}: {} does not exist", df.display());
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().context("short volume syntax")?;
            let source = v.split(':').next().unwrap_or_default();
            if source.starts_with('.') {
                ensure!(
                    dir.join(source).exists(),
                    "{name}: mounts {source}, which does not exist"
                );
            } else {
                ensure!(
                    volumes.contains_key(source),
                    "{name}: volume {source} is not declared"
                );
            }
        }
        match &s["depends_on"] {
            Value::Object(m) => {
                for dep in m.keys() {
                    ensure!(services.contains_key(dep), "{name}: depends on {dep}");
                }
            }
            Value::Array(a) => {
                for dep in a {
                    let dep = dep.as_str().unwrap_or_default();
                    ensure!(services.contains_key(dep), "{name}: depends on {dep}");
                }
            }
            _ => {}
        }
        if s["entrypoint"]
            .as_array()
            .is_some_and(|e| e.iter().any(|w| w == "/demo/demo.sh"))
        {
            for step in strings(&s["command"])? {
                ensure!(
                    demo.contains(&format!("\n  {step})")),
                    "{name}: demo.sh has no step {step}"
                );
            }
        }
        if let Some(test) = s["healthcheck"]["test"].as_array() {
            let words = strings(&Value::Array(test.clone()))?;
            ensure!(words.get(1..3) == Some(&["govshare-broker".into(), "health".into()][..]));
            check_flags(&format!("{name} healthcheck"), &words, &health)?;
        }
        if let Some(cmd) = s["command"].as_array() {
            let words = strings(&Value::Array(cmd.clone()))?;
            if words.first().map(String::as_str) == Some("run") {
                check_flags(&format!("{name} command"), &words, &run)?;
            }
        }
    }
    // Prometheus scrapes the three brokers by service name, on the metrics port the image listens on.
    let prom = &yaml_file(&dir.join("prometheus.yml"))?[0];
    let mut scraped = BTreeSet::new();
    for job in prom["scrape_configs"]
        .as_array()
        .context("scrape_configs")?
    {
        for sc in job["static_configs"].as_array().into_iter().flatten() {
            ensure!(
                sc["labels"]["broker"].is_string(),
                "a target without a broker label"
            );
            for t in strings(&sc["targets"])? {
                let (host, port) = t.split_once(':').context("host:port")?;
                ensure!(port == "9464", "{t}");
                ensure!(services.contains_key(host), "scrapes {host}, not a service");
                scraped.insert(host.to_string());
            }
        }
    }
    ensure!(
        scraped == BTreeSet::from(["hub".into(), "zhejiang".into(), "guangdong".into()]),
        "{scraped:?}"
    );
    for rule in strings(&prom["rule_files"])? {
        ensure!(
            services["prometheus"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v
                    .as_str()
                    .is_some_and(|v| v.contains(&format!("/etc/prometheus/{rule}")))),
            "prometheus.yml loads {rule}, which compose does not mount"
        );
    }
    // Grafana's provisioned data source points at this file's Prometheus.
    let ds = &yaml_file(&govshare_tests::deploy(
        "grafana/provisioning/datasources/prometheus.yml",
    ))?[0];
    let url = ds["datasources"][0]["url"].as_str().context("url")?;
    ensure!(url == "http://prometheus:9090", "{url}");
    for f in files_under(
        &govshare_tests::deploy("grafana/provisioning"),
        &["yml", "yaml"],
    )? {
        yaml_file(&f)?;
    }
    Ok(())
}

// ---- Dockerfile ------------------------------------------------------------------------------

/// The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments).
fn dockerfile() -> Result<Vec<(String, String)>> {
    let text = read(&govshare_tests::deploy("docker/Dockerfile"))?;
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(more) = t.strip_suffix('\\') {
            cur.push_str(more);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (inst, args) = cur
            .split_once(' ')
            .context("instruction without arguments")?;
        out.push((inst.to_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    Ok(out)
}

#[test]
fn the_dockerfile_matches_the_binaries() -> Result<()> {
    let inst = dockerfile()?;
    let get = |name: &str| -> Vec<&str> {
        inst.iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let toolchain = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml"))?;
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .context("rust-toolchain.toml channel")?
        .trim_matches('"');
    let froms = get("FROM");
    ensure!(froms.len() == 2, "a two-stage build: {froms:?}");
    ensure!(
        froms[0].starts_with(&format!("rust:{channel}-")),
        "the builder {:?} is not rust-toolchain.toml's {channel}",
        froms[0]
    );
    ensure!(
        get("RUN")
            .iter()
            .any(|r| r
                .contains("cargo build --release --locked -p govshare-broker -p govshare-client")),
        "no release build of the broker and the client"
    );
    ensure!(get("USER") == ["10001:10001"], "{:?}", get("USER"));
    ensure!(
        get("VOLUME") == ["[\"/var/lib/govshare\"]"],
        "{:?}",
        get("VOLUME")
    );
    ensure!(get("EXPOSE") == ["7443 9464"], "{:?}", get("EXPOSE"));

    let json = |s: &str| -> Result<Vec<String>> {
        let v: Value = serde_json::from_str(s).with_context(|| format!("not exec form: {s}"))?;
        strings(&v)
    };
    let entry = json(get("ENTRYPOINT").first().context("ENTRYPOINT")?)?;
    ensure!(entry == ["govshare-broker"], "{entry:?}");
    let cmd = json(get("CMD").first().context("CMD")?)?;
    ensure!(cmd.first().map(String::as_str) == Some("run"), "{cmd:?}");
    check_flags("CMD", &cmd, &help_flags("run")?)?;
    ensure!(flag_value(&cmd, "--data-dir") == Some("/var/lib/govshare"));
    ensure!(flag_value(&cmd, "--listen") == Some("0.0.0.0:7443"));
    ensure!(flag_value(&cmd, "--metrics-listen") == Some("0.0.0.0:9464"));

    let hc = get("HEALTHCHECK");
    let hc = hc.first().context("HEALTHCHECK")?;
    let (_, exec) = hc.split_once("CMD ").context("HEALTHCHECK ... CMD [...]")?;
    let words = json(exec)?;
    ensure!(words.get(..2) == Some(&["govshare-broker".into(), "health".into()][..]));
    check_flags("HEALTHCHECK", &words, &help_flags("health")?)?;
    let id = flag_value(&words, "--identity").context("--identity")?;
    ensure!(
        id.starts_with("/var/lib/govshare/"),
        "the health check's identity {id} is not in the data dir"
    );
    ensure!(
        govshare_tests::deploy("docker/Dockerfile.dockerignore").is_file(),
        "no Dockerfile.dockerignore"
    );
    Ok(())
}

// ---- systemd ---------------------------------------------------------------------------------

#[test]
fn the_systemd_unit_is_sandboxed() -> Result<()> {
    let text = read(&govshare_tests::deploy("systemd/govshare-broker.service"))?;
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if t.starts_with('[') {
            section = t.to_string();
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .with_context(|| format!("not key=value: {t}"))?;
        keys.entry(format!("{section}{k}"))
            .or_default()
            .push(v.to_string());
    }
    let one = |k: &str| -> Result<&str> {
        keys.get(&format!("[Service]{k}"))
            .and_then(|v| v.last())
            .map(String::as_str)
            .with_context(|| format!("no {k}="))
    };
    // The broker reloads its TLS files on SIGHUP (tests/tests/certificates.rs proves it).
    ensure!(
        one("ExecReload")? == "/bin/kill -HUP $MAINPID",
        "systemctl reload sends SIGHUP"
    );
    let exec: Vec<String> = one("ExecStart")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    ensure!(exec.get(1).map(String::as_str) == Some("run"), "{exec:?}");
    check_flags("ExecStart", &exec, &help_flags("run")?)?;
    ensure!(one("StateDirectory")? == "govshare");
    ensure!(flag_value(&exec, "--data-dir") == Some("/var/lib/govshare"));
    for (k, v) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("SystemCallFilter", "@system-service"),
    ] {
        let all = keys
            .get(&format!("[Service]{k}"))
            .cloned()
            .unwrap_or_default();
        ensure!(all.iter().any(|x| x == v), "{k}={v} is missing ({all:?})");
    }
    ensure!(
        one("DynamicUser")? == "yes" || one("User").is_ok(),
        "runs as root"
    );
    ensure!(one("RestrictAddressFamilies")?.contains("AF_INET"));
    ensure!(keys.contains_key("[Install]WantedBy"));
    Ok(())
}

// ---- govshare-broker health --------------------------------------------------------------------

/// Runs `govshare-broker health ARGS`: (exit code, stdout, stderr).
async fn health(args: &[&str]) -> Result<(i32, String, String)> {
    let bin = govshare_tests::bin_path("govshare-broker")?;
    let out = tokio::process::Command::new(bin)
        .arg("health")
        .args(args)
        .env_remove("GOVSHARE_BROKER")
        .env_remove("GOVSHARE_IDENTITY")
        .env_remove("GOVSHARE_TLS_SERVER_NAME")
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn health_reports_a_serving_broker_and_fails_otherwise() -> Result<()> {
    let broker = TestBroker::start().await?;
    let admin = broker.admin_dir();
    let admin = admin.to_str().context("path")?;
    let url = broker.url();

    let (code, out, err) = health(&["--broker", &url, "--identity", admin]).await?;
    ensure!(code == 0 && out.trim() == "SERVING", "{code} {out} {err}");
    let (code, out, _) = health(&[
        "--broker",
        &url,
        "--identity",
        admin,
        "--service",
        "govshare.v1.ExchangeService",
    ])
    .await?;
    ensure!(code == 0 && out.trim() == "SERVING", "{code} {out}");

    // Nothing listening: exit 2 and a message that says so.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let (code, _, err) = health(&[
        "--broker",
        &format!("https://{closed}"),
        "--identity",
        admin,
        "--timeout",
        "3s",
    ])
    .await?;
    ensure!(code == 2, "wrong address: exit {code}: {err}");
    ensure!(err.contains("cannot check the health"), "{err}");

    // Usage errors: exit 2.
    let (code, _, err) = health(&["--broker", &url, "--identity", "/nonexistent"]).await?;
    ensure!(code == 2 && err.contains("node.pem"), "{code} {err}");
    let (code, _, err) = health(&[
        "--broker",
        &url.replace("https", "http"),
        "--identity",
        admin,
    ])
    .await?;
    ensure!(code == 2 && err.contains("https://"), "{code} {err}");
    let (code, _, err) = health(&[
        "--broker",
        &url,
        "--identity",
        admin,
        "--service",
        "no.such.Service",
    ])
    .await?;
    ensure!(code == 2 && err.contains("no service"), "{code} {err}");

    // A certificate from another CA: the handshake fails, exit 2.
    let other = TestBroker::start_with_id("440000/hub").await?;
    let (code, _, err) = health(&[
        "--broker",
        &url,
        "--identity",
        other.admin_dir().to_str().context("path")?,
    ])
    .await?;
    ensure!(code == 2, "foreign identity: exit {code}: {err}");
    other.shutdown().await?;
    broker.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn health_reports_a_child_cut_off_from_its_parent() -> Result<()> {
    let mut parent = TestBroker::start_with_id("000000/hub").await?;
    let child = TestBroker::start_child("330000/hub", &parent, &[], |c| {
        c.federation.max_backoff_secs = 1;
    })
    .await?;
    let admin = child.admin_dir();
    let admin = admin.to_str().context("path")?.to_string();
    let url = child.url();
    let link = |url: String, admin: String| async move {
        health(&[
            "--broker",
            &url,
            "--identity",
            &admin,
            "--service",
            "govshare.v1.FederationService",
        ])
        .await
    };
    govshare_tests::wait_until(Duration::from_secs(20), "the link to come up", || {
        let (url, admin) = (url.clone(), admin.clone());
        async move {
            let (code, out, _) = link(url, admin).await?;
            Ok((code == 0 && out.trim() == "SERVING").then_some(()))
        }
    })
    .await?;

    parent.stop_now().await?;
    let (code, out) = govshare_tests::wait_until(
        Duration::from_secs(20),
        "the link to be reported down",
        || {
            let (url, admin) = (url.clone(), admin.clone());
            async move {
                let (code, out, _) = link(url, admin).await?;
                Ok((code != 0).then_some((code, out)))
            }
        },
    )
    .await?;
    ensure!(code == 1 && out.trim() == "NOT_SERVING", "{code} {out}");
    // The child itself still serves its own departments.
    let (code, out, _) = health(&["--broker", &url, "--identity", &admin]).await?;
    ensure!(code == 0 && out.trim() == "SERVING", "{code} {out}");
    child.shutdown().await?;
    Ok(())
}
