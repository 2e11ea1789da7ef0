#!/usr/bin/env bash
# Validate everything in deploy/, offline (after the installs, which use Debian and PyPI only):
#   - Kubernetes manifests: each document against the schemas bundled in PyPI's
#     kubernetes-validate (strict: unknown fields fail), for Kubernetes 1.29 (the first with
#     native sidecars on by default) and 1.37; ServiceMonitor against the subset schema in
#     kubernetes/schemas/; any other kind fails (no silent "schema not found" pass);
#   - structure the gateway relies on, in each Deployment that runs it (sidecar.yaml,
#     shared-service.yaml, fleet.yaml; fleet.yaml's Redis and PostgreSQL are StatefulSets):
#     native sidecar (initContainers + restartPolicy: Always), probes on /healthz and /readyz,
#     resources, a non-root read-only securityContext, secret paths of the config mounted, and
#     a ledger: either [ledger] path on an emptyDir/PVC mount or [ledger] postgres_url (no
#     volume); [fleet] only with postgres_url (one ledger for the fleet); no password in a
#     store URL of a ConfigMap or of a literal env value (they come from Secrets);
#   - every gateway config (ConfigMaps, gateway.container.toml, systemd/gateway.toml) with
#     `linkup-gateway check-config`, secret paths pointed at temporary dummy files (and the
#     all-zero placeholder key hash replaced by a dummy hash); a
#     ConfigMap together with its Deployment's LINKUP_GATEWAY__* env overrides ($(VAR) of a
#     Secret replaced by a dummy), so a misspelt override fails;
#   - the systemd unit with `systemd-analyze verify` (any warning fails);
#   - the Dockerfile: static checks (no container engine runs here).
# Usage: bash deploy/validate.sh [DEPLOY_DIR]   (default: this script's directory)
# Exit status: 0 when all is valid, 1 otherwise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
deploy="$(cd "${1:-$here}" && pwd)"
repo="$(cd "$here/.." && pwd)"
KV_VERSION=1.37.0

# --- installs (skipped when present) ------------------------------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq systemd >/dev/null
fi
py=python3
have_deps='import sys, kubernetes_validate, yaml, jsonschema; sys.version_info >= (3, 11) or __import__("tomli")'
if ! "$py" -c "$have_deps" >/dev/null 2>&1; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/linkup-gateway-validate"
  if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    fi
  fi
  py="$venv/bin/python"
  "$py" -c "$have_deps" >/dev/null 2>&1 \
    || "$py" -m pip install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" \
         "tomli; python_version < '3.11'"
fi
(cd "$repo" && cargo build -q --locked --bin linkup-gateway)
gateway="$repo/target/debug/linkup-gateway"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
bad() { echo "FAIL $*"; fail=1; }

# Run check-config on a config whose secret files live under PREFIX, with dummy secrets.
check_config() { # name file prefix
  local name="$1" file="$2" prefix="$3" sec="$tmp/secrets.$RANDOM" out
  mkdir -p "$sec"
  printf 'dummy-api-key\n' >"$sec/api_key"
  printf 'dummy-admin-token\n' >"$sec/admin_token"
  # The templates' all-zero placeholder key hash, which check-config refuses (on purpose: an
  # operator must put keygen's hash there), stands for a real one here, as the secrets do.
  local dummy_sha
  dummy_sha="$(printf 'dummy-virtual-key' | sha256sum | cut -d' ' -f1)"
  sed -e "s#${prefix}#${sec}/#g" -e "s#\"0\{64\}\"#\"${dummy_sha}\"#g" "$file" >"$sec/gateway.toml"
  # Overrides from the Deployment's env (written next to the config by the manifest check).
  local -a envs=()
  [ -f "${file%.toml}.env" ] && mapfile -t envs <"${file%.toml}.env"
  if out="$(env LINKUP_API_KEY=x "${envs[@]}" "$gateway" check-config --config "$sec/gateway.toml" 2>&1)"; then
    echo "ok   $name: check-config${envs[*]:+ (with ${#envs[@]} env override(s))}: ${out#*: }"
  else
    bad "$name: check-config:"; echo "$out" | sed '1d; s/^/     /'
  fi
}

# --- Kubernetes ----------------------------------------------------------------------------
shopt -s nullglob
manifests=("$deploy"/kubernetes/*.yaml)
[ ${#manifests[@]} -gt 0 ] || bad "no manifests in $deploy/kubernetes"
mkdir -p "$tmp/configs"
if ! "$py" - "$deploy/kubernetes/schemas" "$tmp/configs" "${manifests[@]}" <<'PY'; then fail=1; fi
import json, os, re, sys
import jsonschema, yaml
import kubernetes_validate as kv
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

schemas, outdir, files = sys.argv[1], sys.argv[2], sys.argv[3:]
VERSIONS = ["1.29.0", "1.37.0"]
crds = {}
for f in os.listdir(schemas) if os.path.isdir(schemas) else []:
    s = json.load(open(os.path.join(schemas, f)))
    crds[(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"])] = s
failed = False
# scheme://user:PASSWORD@host: group 1 is the password.
PASSWORD_IN_URL = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:]*:([^/@]+)@")

def fail(where, msg):
    global failed
    failed = True
    print(f"FAIL {where}: {msg}")

def check_gateway_container(where, c, pod, cfg):
    """What the gateway container needs, whatever the pattern."""
    probes = {p: (c.get(p) or {}).get("httpGet", {}).get("path") for p in ("readinessProbe", "livenessProbe")}
    if probes != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
        fail(where, f"gateway probes must be readiness /readyz and liveness /healthz, got {probes}")
    res = c.get("resources", {})
    if not res.get("requests") or not res.get("limits", {}).get("memory"):
        fail(where, "gateway needs resource requests and a memory limit")
    sc, psc = c.get("securityContext", {}), pod.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        fail(where, "gateway must run as non-root")
    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
        fail(where, "gateway needs readOnlyRootFilesystem: true and allowPrivilegeEscalation: false")
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    if cfg is None:
        fail(where, "no ConfigMap with gateway.toml in this file")
        return
    for key in ("admin_token_file", "api_key_file"):
        m = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', cfg, re.M)
        if not m:
            fail(where, f"gateway.toml has no {key}")
            continue
        d = os.path.dirname(m.group(1))
        if "secret" not in vols.get(mounts.get(d, ""), {}):
            fail(where, f"{key} {m.group(1)}: {d} is not a Secret volume mount")
    try:
        toml = tomllib.loads(cfg)
    except tomllib.TOMLDecodeError as e:
        fail(where, f"gateway.toml: TOML: {e}")
        return
    ledger, fleet = toml.get("ledger", {}), toml.get("fleet")
    path, pg = ledger.get("path"), ledger.get("postgres_url")
    if pg is not None:
        pass  # the fleet's ledger, in PostgreSQL: nothing to mount
    elif not (isinstance(path, str) and path.startswith("/")):
        fail(where, "gateway.toml needs [ledger] path (absolute) on a writable volume, "
                    "or [ledger] postgres_url")
    else:
        v = vols.get(mounts.get(os.path.dirname(path), ""), {})
        if not ("emptyDir" in v or "persistentVolumeClaim" in v):
            fail(where, f"ledger {path}: its directory is not an emptyDir or PVC mount")
    if fleet is not None and pg is None:
        fail(where, "[fleet] needs [ledger] postgres_url: with a ledger per pod, /usage sees one "
                    "replica and budgets are reseeded from one replica's rows")
    # Store URLs: the ConfigMap is readable by anyone who may read the namespace's config;
    # passwords come from Secrets (env valueFrom, or $(VAR) of a variable that does).
    urls = {"ledger.postgres_url": pg, "fleet.redis_url": (fleet or {}).get("redis_url")}
    for key, url in urls.items():
        if isinstance(url, str) and PASSWORD_IN_URL.search(url):
            fail(where, f"gateway.toml {key} holds a password: put the URL in a Secret (env)")
    from_secret = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for e in c.get("env", []):
        m = PASSWORD_IN_URL.search(e.get("value", ""))
        if not m:
            continue
        ref = re.fullmatch(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", m.group(1))
        if not (ref and ref.group(1) in from_secret):
            fail(where, f"env {e['name']}: a literal password in a URL; use $(VAR) of a variable "
                        "from secretKeyRef, or valueFrom.secretKeyRef for the whole URL")

for path in files:
    name = os.path.basename(path)
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        fail(name, f"YAML: {e}")
        continue
    cfg = out = None
    for i, d in enumerate(docs):
        where = f"{name}[{i}] {d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        key = (d.get("apiVersion"), d.get("kind"))
        if key in crds:
            errs = sorted(jsonschema.Draft202012Validator(crds[key]).iter_errors(d), key=str)
            for e in errs:
                fail(where, f"{'/'.join(map(str, e.absolute_path))}: {e.message} (bundled CRD subset schema)")
            if not errs:
                print(f"ok   {where} (bundled CRD subset schema)")
            continue
        ok = True
        for v in VERSIONS:
            try:
                kv.validate(d, v, strict=True)
            except kv.SchemaNotFoundError:
                fail(where, f"no schema for {key} (not a built-in kind; add a schema to kubernetes/schemas/)")
                ok = False
                break
            except kv.ValidationError as e:
                fail(where, f"Kubernetes {v}: {'/'.join(map(str, e.path))}: {e.message}")
                ok = False
        if ok:
            print(f"ok   {where} (Kubernetes {', '.join(VERSIONS)}, strict)")
        if d.get("kind") == "ConfigMap" and "gateway.toml" in (d.get("data") or {}):
            cfg = d["data"]["gateway.toml"]
            out = os.path.join(outdir, f"{os.path.splitext(name)[0]}.{d['metadata']['name']}.toml")
            open(out, "w").write(cfg)
    for i, d in enumerate(docs):
        if d.get("kind") != "Deployment":
            continue
        where = f"{name}[{i}] Deployment/{d['metadata']['name']}"
        pod = d["spec"]["template"]["spec"]
        inits, mains = pod.get("initContainers", []), pod.get("containers", [])
        gws = [c for c in inits + mains if "linkup-gateway" in c.get("image", "")]
        if len(gws) != 1:
            fail(where, "expected exactly one linkup-gateway container")
            continue
        gw = gws[0]
        # Next to an app it must be a native sidecar: a plain init container never lets the
        # app start, a second regular container may stop before the app does.
        if (gw in inits or len(mains) > 1) and not (gw in inits and gw.get("restartPolicy") == "Always"):
            fail(where, "next to an app the gateway must be a native sidecar "
                        "(initContainers with restartPolicy: Always)")
        check_gateway_container(where, gw, pod, cfg)
        # The gateway's LINKUP_GATEWAY__* overrides go to check-config with the ConfigMap
        # (a misspelt key is refused there), $(VAR) references replaced by a dummy value.
        # Overrides taken whole from a Secret cannot be checked here.
        env = [f"{e['name']}={re.sub(r'[$][(][A-Za-z_][A-Za-z0-9_]*[)]', 'dummy-secret', e['value'])}"
               for e in gw.get("env", []) if e["name"].startswith("LINKUP_GATEWAY__") and "value" in e]
        if env and out:
            open(os.path.splitext(out)[0] + ".env", "w").write("".join(l + "\n" for l in env))
        if not failed:
            print(f"ok   {where}: gateway container structure")
sys.exit(1 if failed else 0)
PY

for cfg in "$tmp"/configs/*.toml; do
  check_config "kubernetes/$(basename "$cfg")" "$cfg" /run/secrets/linkup/
done
[ -f "$deploy/gateway.container.toml" ] && check_config gateway.container.toml "$deploy/gateway.container.toml" /run/secrets/linkup/
[ -f "$deploy/systemd/gateway.toml" ] && check_config systemd/gateway.toml "$deploy/systemd/gateway.toml" /run/credentials/linkup-gateway.service/

# --- systemd ---------------------------------------------------------------------------------
for unit in "$deploy"/systemd/*.service; do
  # verify checks that ExecStart's binary exists: point it at the one just built.
  mkdir -p "$tmp/units"
  sed "s#/usr/local/bin/linkup-gateway#$gateway#g" "$unit" >"$tmp/units/$(basename "$unit")"
  out="$(systemd-analyze verify "$tmp/units/$(basename "$unit")" 2>&1)" && rc=0 || rc=$?
  if [ $rc -ne 0 ] || [ -n "$out" ]; then
    bad "systemd/$(basename "$unit"): systemd-analyze verify (exit $rc; warnings count as failures):"
    echo "$out" | sed 's/^/     /'
  else
    echo "ok   systemd/$(basename "$unit"): systemd-analyze verify, no warnings"
  fi
  for k in DynamicUser=yes StateDirectory= ProtectSystem=strict LoadCredential=api_key: ExecReload= TimeoutStopSec=; do
    grep -q "^$k" "$unit" || bad "systemd/$(basename "$unit"): missing $k"
  done
done

# --- Dockerfile (static: no container engine here) ---------------------------------------------
df="$deploy/Dockerfile"
if [ -f "$df" ]; then
  n=$(grep -c '^FROM ' "$df" || true)
  [ "$n" -ge 2 ] || bad "Dockerfile: not multi-stage ($n FROM)"
  grep -q 'cargo build --release --locked' "$df" || bad "Dockerfile: no 'cargo build --release --locked'"
  last_user=$(grep '^USER ' "$df" | tail -1 | awk '{print $2}')
  case "$last_user" in ""|root|0|0:*) bad "Dockerfile: final image must set a non-root USER";; esac
  # Every COPY from the build context must exist (distroless has no shell to fail later).
  while read -r src; do
    [ -e "$repo/$src" ] || bad "Dockerfile: COPY source $src does not exist"
  done < <(grep '^COPY ' "$df" | grep -v -- '--from=' | awk '{print $2}' | grep -v '^\.$')
  [ $fail -eq 0 ] && echo "ok   Dockerfile: multi-stage ($n stages), --locked, USER $last_user, COPY sources exist"
fi

if [ $fail -ne 0 ]; then echo "deploy/ validation FAILED"; exit 1; fi
echo "deploy/ validation passed"
