//! `cargo xtask deploy-check`: checks the Kubernetes install in `deploy/` offline.
//!
//! - Every `deploy/*.yaml` except `kustomization.yaml` is validated by `kubernetes-validate`
//!   (PyPI) with `--strict` (unknown fields are errors) against the Kubernetes 1.29.0 schemas.
//!   The tool is installed with `python3 -m pip` when `pip show` does not find it, retrying with
//!   `--break-system-packages` when pip refuses an externally managed Python. It runs as
//!   `python3 -m kubernetes_validate`, so the interpreter pip installed it for is the one used
//!   even where the console script is not on PATH.
//! - The arguments of the `agent` container in `deploy/daemonset.yaml` must be the `agent`
//!   subcommand followed by flags that `memscope agent --help` lists, each in the form that
//!   flag takes (`--flag=VALUE` or `--flag VALUE` for a value, bare for a switch). Then
//!   `memscope ARGS... --help` must succeed: clap parses every argument before it reaches the
//!   trailing `--help`, so values are checked by the agent's own parsers (addresses, sizes,
//!   durations) without starting the agent. `memscope` is built first (`cargo build -p
//!   profiler-user`, debug) so that the help is the current one.
//!
//! - `deploy/monitoring/*.yaml` (the Prometheus Operator's PodMonitor, a CRD that
//!   kubernetes-validate does not know) are validated with Python's `jsonschema` (installed with
//!   kubernetes-validate) against the CRD's openAPI schema vendored beside them
//!   (`podmonitor.schema.json`), made strict as `kubectl apply --validate=strict` is: a field the
//!   schema does not define is an error.
//! - Each `kustomization.yaml` lists every manifest of its directory, so `kubectl apply -k`
//!   applies all of them.
//!
//! Limits: no YAML parser (xtask keeps its dependencies small). The container's `args` are read
//! by indentation and must be a block list (`- item` lines) of plain or quoted scalars. Paths
//! given to the agent (token file, certificates) are not checked: they exist only in the pod.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, step};

/// Kubernetes version whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.29.0";
/// The PyPI package, and the module it is run as.
const VALIDATOR_PACKAGE: &str = "kubernetes-validate";
const VALIDATOR_MODULE: &str = "kubernetes_validate";
/// The container in `daemonset.yaml` that runs `memscope` (the image's entrypoint).
const AGENT_CONTAINER: &str = "agent";

pub fn check() -> Result<()> {
    let deploy = cmd::workspace_root().join("deploy");
    let manifests = manifests(&deploy)?;
    ensure_validator()?;
    validate(&manifests)?;
    check_kustomization(&deploy, &manifests)?;
    let monitoring = deploy.join("monitoring");
    let monitors = manifests_in(&monitoring)?;
    validate_monitors(&monitoring, &monitors)?;
    check_kustomization(&monitoring, &monitors)?;
    check_agent_args(&deploy.join("daemonset.yaml"))
}

/// `*.yaml` of `dir` except `kustomization.yaml`, sorted.
fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>> {
    manifests(dir)
}

/// Every manifest of `dir` is a resource of its `kustomization.yaml` (a `- FILE` line).
fn check_kustomization(dir: &Path, manifests: &[PathBuf]) -> Result<()> {
    let path = dir.join("kustomization.yaml");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| strip_comment(l).trim().strip_prefix("- "))
        .map(str::trim)
        .collect();
    let missing: Vec<&str> = manifests
        .iter()
        .filter_map(|m| m.file_name()?.to_str())
        .filter(|name| !listed.contains(name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} does not list {}: `kubectl apply -k` would leave them out",
            path.display(),
            missing.join(", ")
        );
    }
    step(format!(
        "{}: lists all {} manifests",
        path.display(),
        manifests.len()
    ));
    Ok(())
}

/// Validates the custom resources of `dir` against the vendored CRD schemas (see the module
/// doc): `KIND` -> `kind.schema.json` in lower case.
const MONITOR_CHECK: &str = r#"
import json, sys, yaml, jsonschema
def strict(s):
    if isinstance(s, dict):
        s = {k: strict(v) for k, v in s.items()}
        if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s                 and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        return s
    if isinstance(s, list):
        return [strict(v) for v in s]
    return s
schema_dir, failures = sys.argv[1], 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        kind = doc.get("kind", "?")
        try:
            schema = strict(json.load(open(f"{schema_dir}/{kind.lower()}.schema.json")))
        except FileNotFoundError:
            print(f"{path}: no vendored schema for kind {kind}"); failures += 1; continue
        schema.pop("$comment", None)
        # metadata is the API server's ObjectMeta, not the CRD's: name and namespace at least.
        meta = doc.get("metadata") or {}
        if not meta.get("name") or not meta.get("namespace"):
            print(f"{path}: {kind} needs metadata.name and metadata.namespace"); failures += 1
        if doc.get("apiVersion") != "monitoring.coreos.com/v1":
            print(f"{path}: apiVersion {doc.get('apiVersion')!r} is not monitoring.coreos.com/v1"); failures += 1
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        for e in errors:
            print(f"{path}: {kind} {'/'.join(map(str, e.path)) or '(root)'}: {e.message}")
        failures += len(errors)
sys.exit(1 if failures else 0)
"#;

fn validate_monitors(dir: &Path, manifests: &[PathBuf]) -> Result<()> {
    step(format!(
        "jsonschema (vendored Prometheus Operator CRD schema, strict): {}",
        manifests
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let (ok, log) = run_captured(
        python()
            .arg("-c")
            .arg(MONITOR_CHECK)
            .arg(dir)
            .args(manifests),
    )?;
    if !ok {
        bail!(
            "the monitors in {} do not fit their CRD schema:\n{}",
            dir.display(),
            log.trim_end()
        );
    }
    Ok(())
}

/// `deploy/*.yaml` except `kustomization.yaml`, sorted.
fn manifests(deploy: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        fs::read_dir(deploy).with_context(|| format!("cannot read {}", deploy.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read {}", deploy.display()))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            files.push(path);
        }
    }
    if files.is_empty() {
        bail!("no manifests (*.yaml) in {}", deploy.display());
    }
    files.sort();
    Ok(files)
}

fn python() -> Command {
    Command::new("python3")
}

/// Installs kubernetes-validate with pip unless `pip show` finds it.
fn ensure_validator() -> Result<()> {
    if cmd::succeeds(python().args(["-m", "pip", "show", VALIDATOR_PACKAGE])) {
        return Ok(());
    }
    step(format!("python3 -m pip install {VALIDATOR_PACKAGE}"));
    let install = ["-m", "pip", "install", "--quiet", VALIDATOR_PACKAGE];
    let (ok, log) = run_captured(python().args(install))?;
    if ok {
        return Ok(());
    }
    if !log.contains("externally-managed-environment") {
        bail!(
            "installing {VALIDATOR_PACKAGE} with pip failed:\n{}",
            log.trim_end()
        );
    }
    step(format!(
        "pip refused an externally managed Python: python3 -m pip install --break-system-packages {VALIDATOR_PACKAGE}"
    ));
    let (ok, log) = run_captured(python().args(install).arg("--break-system-packages"))?;
    if !ok {
        bail!(
            "installing {VALIDATOR_PACKAGE} with pip failed:\n{}",
            log.trim_end()
        );
    }
    Ok(())
}

/// Runs `cmd` to the end; returns whether it succeeded and its stdout and stderr together.
fn run_captured(cmd: &mut Command) -> Result<(bool, String)> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", cmd::describe(cmd)))?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), log))
}

/// Validates each manifest; reports every failing file with the tool's own message.
fn validate(manifests: &[PathBuf]) -> Result<()> {
    step(format!(
        "{VALIDATOR_PACKAGE} --strict -k {KUBERNETES_VERSION}: {}",
        manifests
            .iter()
            .filter_map(|p| p.file_name()?.to_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let mut failures = Vec::new();
    for manifest in manifests {
        let (ok, log) = run_captured(
            python()
                .args(["-m", VALIDATOR_MODULE, "--strict", "-k", KUBERNETES_VERSION])
                .arg(manifest)
                .current_dir(cmd::workspace_root()),
        )?;
        if !ok {
            failures.push(format!("{}:\n{}", manifest.display(), log.trim_end()));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{VALIDATOR_PACKAGE} rejected {} of {} manifests:\n{}",
            failures.len(),
            manifests.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// The agent container's args are the `agent` subcommand and flags memscope accepts.
fn check_agent_args(daemonset: &Path) -> Result<()> {
    let yaml = fs::read_to_string(daemonset)
        .with_context(|| format!("cannot read {}", daemonset.display()))?;
    let args = container_args(&yaml, AGENT_CONTAINER)
        .with_context(|| format!("in {}", daemonset.display()))?;
    step("cargo build -p profiler-user (memscope's flags)");
    cmd::run(cmd::cargo().args(["build", "-p", "profiler-user"]))
        .context("building memscope failed")?;
    let memscope = cmd::target_dir().join("debug/memscope");
    let help = cmd::output(Command::new(&memscope).args(["agent", "--help"]))
        .context("`memscope agent --help` failed")?;
    let flags = parse_help_flags(&help);
    if flags.is_empty() {
        bail!("found no flags in `memscope agent --help`:\n{help}");
    }
    check_args(&args, &flags).with_context(|| {
        format!(
            "{}: the args of container `{AGENT_CONTAINER}` do not fit `memscope agent --help`",
            daemonset.display()
        )
    })?;
    // clap parses (and checks the value of) every argument before the trailing --help.
    let (ok, log) = run_captured(Command::new(&memscope).args(&args).arg("--help"))?;
    if !ok {
        bail!(
            "{}: memscope rejects the args of container `{AGENT_CONTAINER}`:\n{}",
            daemonset.display(),
            log.trim_end()
        );
    }
    step(format!(
        "daemonset.yaml: `memscope {}` parses",
        args.join(" ")
    ));
    Ok(())
}

/// Long flags in clap's help, each with whether it takes a value (`--name <VALUE>`).
fn parse_help_flags(help: &str) -> BTreeMap<String, bool> {
    let mut flags = BTreeMap::new();
    for line in help.lines() {
        let mut words = line.split_whitespace().peekable();
        while let Some(word) = words.next() {
            let word = word.trim_end_matches(',');
            if let Some(long) = word.strip_prefix("--").filter(|l| !l.is_empty()) {
                let takes_value = words.peek().is_some_and(|next| next.starts_with('<'));
                flags.insert(long.to_string(), takes_value);
            } else if !word.starts_with('-') {
                break; // the description: flags come first on an option's line
            }
        }
    }
    flags
}

/// `agent`, then known flags, each in its form: a value after `=` or as the next argument for
/// flags that take one, nothing for switches.
fn check_args(args: &[String], flags: &BTreeMap<String, bool>) -> Result<()> {
    match args.first() {
        Some(first) if first == "agent" => {}
        Some(first) => bail!("the first argument is `{first}`, not the subcommand `agent`"),
        None => bail!("the args are empty: they must start with `agent`"),
    }
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            bail!("unexpected argument `{arg}`: not a flag, and no flag before it takes a value");
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        let Some(&takes_value) = flags.get(name) else {
            bail!("`--{name}` is not a flag of `memscope agent`");
        };
        match (takes_value, inline_value) {
            (true, Some(_)) | (false, None) => {}
            (true, None) => match rest.next() {
                Some(value) if !value.starts_with("--") => {}
                _ => bail!("`--{name}` needs a value (`--{name}=VALUE`)"),
            },
            (false, Some(_)) => bail!("`--{name}` is a switch and takes no value (`{arg}`)"),
        }
    }
    Ok(())
}

/// The block-list `args` of the container named `name`, read by indentation.
fn container_args(yaml: &str, name: &str) -> Result<Vec<String>> {
    let lines: Vec<&str> = yaml.lines().collect();
    let header = format!("- name: {name}");
    let start = lines
        .iter()
        .position(|l| strip_comment(l).trim() == header)
        .with_context(|| format!("no container `{name}` (a line `{header}`)"))?;
    let item_indent = indent(lines[start]);
    // The container's own lines: until the next line at or left of its `- name:`.
    let body = lines[start + 1..]
        .iter()
        .take_while(|l| is_blank(l) || indent(l) > item_indent);
    let mut body = body.peekable();
    while let Some(line) = body.next() {
        let text = strip_comment(line).trim();
        let Some(inline) = text.strip_prefix("args:") else {
            continue;
        };
        if indent(line) != item_indent + 2 {
            continue; // an `args:` of something nested in the container
        }
        if !inline.trim().is_empty() {
            bail!(
                "container `{name}`: write `args` as a block list (`- item` lines), not `{text}`"
            );
        }
        let mut args = Vec::new();
        while let Some(item) = body.peek() {
            if is_blank(item) {
                body.next();
                continue;
            }
            let Some(value) = strip_comment(item).trim().strip_prefix("- ") else {
                break;
            };
            if indent(item) < item_indent + 2 {
                break;
            }
            args.push(unquote(value.trim())?);
            body.next();
        }
        return Ok(args);
    }
    bail!("container `{name}` has no `args`")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_blank(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// The line without a trailing `# comment` (a `#` at the start or after a space, outside a
/// quoted scalar; a quote opens one only at the start of a word).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') if prev == ' ' => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev == ' ' || prev == '\t' => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// A plain, 'single' or "double" quoted scalar (with `''`, `\"` and `\\` unescaped).
fn unquote(value: &str) -> Result<String> {
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        return Ok(inner.replace("''", "'"));
    }
    if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        return Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
    }
    if value.starts_with(['"', '\'', '[', '{', '&', '*', '|', '>']) {
        bail!("cannot read the argument `{value}`: use a plain or quoted scalar");
    }
    Ok(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMONSET: &str = "
spec:
  template:
    spec:
      containers:
        - name: sidecar
          args: [\"x\"]
        - name: agent   # the agent
          image: memscope:latest
          args:
            - agent
            - --listen=127.0.0.1:7411   # loopback
            - \"--tokens\"
            - '/etc/memscope/auth/tokens'

            - --allow-insecure-remote
          readinessProbe:
            exec:
              command:
                - bash
                - -c
                - |
                  args: not these
";

    const HELP: &str = "Usage: memscope agent [OPTIONS]

Options:
      --listen <ADDR:PORT>          Address to listen on [default: 127.0.0.1:7411]
      --tokens <FILE>               Token file: lines `NAME ROLE TOKEN` --not-a-flag
      --allow-insecure-remote       Serve a non-loopback address without TLS
  -h, --help                        Print help
";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The agent container's block list is read with comments, quotes and blank lines; other
    /// containers and nested `args:` lines are ignored.
    #[test]
    fn reads_container_args() {
        let args = container_args(DAEMONSET, "agent").unwrap();
        assert_eq!(
            args,
            strings(&[
                "agent",
                "--listen=127.0.0.1:7411",
                "--tokens",
                "/etc/memscope/auth/tokens",
                "--allow-insecure-remote"
            ])
        );
        let err = container_args(DAEMONSET, "sidecar").unwrap_err();
        assert!(format!("{err:#}").contains("block list"), "{err:#}");
        assert!(container_args(DAEMONSET, "missing").is_err());
    }

    /// Help lines give long flags and whether they take a value; descriptions do not.
    #[test]
    fn parses_help() {
        let flags = parse_help_flags(HELP);
        let expected: BTreeMap<String, bool> = [
            ("listen", true),
            ("tokens", true),
            ("allow-insecure-remote", false),
            ("help", false),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(flags, expected);
    }

    /// Unknown flags, a missing subcommand, values on switches and missing values fail.
    #[test]
    fn checks_args_against_help() {
        let flags = parse_help_flags(HELP);
        let ok = |v: &[&str]| check_args(&strings(v), &flags).is_ok();
        assert!(ok(&[
            "agent",
            "--listen=0.0.0.0:1",
            "--tokens",
            "/t",
            "--allow-insecure-remote"
        ]));
        assert!(!ok(&["--listen=0.0.0.0:1"]));
        assert!(!ok(&["agent", "--listn=0.0.0.0:1"]));
        assert!(!ok(&["agent", "--allow-insecure-remote=true"]));
        assert!(!ok(&["agent", "--tokens"]));
        assert!(!ok(&["agent", "--tokens", "--listen=x"]));
        assert!(!ok(&["agent", "stray"]));
    }
}
