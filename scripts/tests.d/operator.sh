#!/usr/bin/env bash
# Manifest validation for the operator, with real tools: the CRDs the binary generates, the
# objects it renders for every example, the examples against the CRD schema, and the Helm
# chart rendered and linted by real Helm (helm-python-sdk) with default values and each
# values file in ci/, all validated with kubernetes-validate. Runs from the repository root
# after scripts/install-deps.sh; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

target_dir=${CARGO_TARGET_DIR:-target}
# The binary the Rust tests built; its command line and `crd` output are tested in
# operator/tests/cli.rs.
source scripts/cargo-selection.sh
build_test_binaries
operator="$target_dir/debug/dlengine-operator"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "--- the chart ships the same CRDs as crds/"
"$operator" crd > "$work/crds.yaml"
cmp crds/dlengine.io.yaml charts/dlengine-operator/crds/dlengine.io.yaml || { echo "charts/dlengine-operator/crds/ differs from crds/"; exit 1; }

echo "--- rendering every example"
"$operator" render examples/*.yaml --output-dir "$work/rendered" > "$work/rendered.list"
echo "$(wc -l < "$work/rendered.list") objects rendered"

python - "$work" <<'PY'
import copy, glob, os, sys
import jsonschema, yaml
import helm_python as helm
import kubernetes_validate

work = sys.argv[1]
# The oldest Kubernetes the operator is built for (k8s-openapi feature v1_35) and the newest
# kubernetes-validate knows.
VERSIONS = ["1.35.0", kubernetes_validate.utils.latest_version()]
failures = []
checked = 0

def fail(what, why):
    failures.append(f"{what}: {why}")
    print(f"FAIL {what}: {why}")

def documents(text):
    return [d for d in yaml.safe_load_all(text) if d]

crds = {d["spec"]["names"]["kind"]: d for d in documents(open(os.path.join(work, "crds.yaml")).read())}

def openapi_to_jsonschema(schema):
    """Structural OpenAPI v3 (as the apiserver reads it) to JSON Schema."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties",):
            out[key] = {k: openapi_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(v) for v in value]
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "description", "title", "default"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out

validators = {}
for kind, crd in crds.items():
    version = crd["spec"]["versions"][0]
    validators[kind] = jsonschema.Draft202012Validator(openapi_to_jsonschema(version["schema"]["openAPIV3Schema"]))

def validate_custom(obj, where):
    errors = sorted(validators[obj["kind"]].iter_errors(obj), key=lambda e: list(e.path))
    for e in errors:
        fail(where, f"{'.'.join(map(str, e.path))}: {e.message}")
    return not errors

def validate_builtin(obj, where):
    global checked
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.utils.ValidationError as e:
            fail(f"{where} (k8s {version})", f"{'.'.join(map(str, e.path))}: {e.message}")
            return False
        except kubernetes_validate.utils.SchemaNotFoundError as e:
            fail(where, e.message)
            return False
    checked += 1
    return True

def validate_object(obj, where):
    global checked
    if obj.get("kind") in validators and obj.get("apiVersion", "").startswith("dlengine.io/"):
        if validate_custom(obj, where):
            checked += 1
    elif obj.get("kind") == "ServiceMonitor":
        # No schema ships for the Prometheus Operator's CRDs: check its required shape.
        ok = obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj["spec"].get("selector") and obj["spec"].get("endpoints")
        if not ok:
            fail(where, "ServiceMonitor without selector or endpoints")
        checked += 1
    else:
        validate_builtin(obj, where)

print("--- CRDs against the apiextensions schema")
for kind, crd in crds.items():
    validate_builtin(crd, f"CRD {kind}")

print("--- rendered operator objects")
rendered = sorted(glob.glob(os.path.join(work, "rendered", "**", "*.yaml"), recursive=True))
if not rendered:
    fail("render", "no objects rendered")
for path in rendered:
    for obj in documents(open(path).read()):
        validate_object(obj, os.path.relpath(path, work))

print("--- examples against the generated CRD schema")
examples = sorted(glob.glob("examples/*.yaml"))
for path in examples:
    for obj in documents(open(path).read()):
        validate_object(obj, path)
# The check must be able to fail: a broken copy of an example is refused.
broken = documents(open(examples[0]).read())[0]
broken = copy.deepcopy(broken)
broken["spec"]["roles"][0]["replicas"] = "three"
broken["spec"]["network"] = {"kvTransport": "Carrier pigeon"}
errors = list(validators["InferenceDeployment"].iter_errors(broken))
if len(errors) < 2:
    fail("schema self-check", f"a broken example was accepted ({errors})")

print("--- Helm chart: lint and render with default values and each ci/ values file")
chart_dir = "charts/dlengine-operator"
chart = helm.Chart.load(chart_dir)
value_sets = [("default", {})] + [(os.path.basename(p), yaml.safe_load(open(p)) or {}) for p in sorted(glob.glob(f"{chart_dir}/ci/*.yaml"))]
if len(value_sets) < 4:
    fail("chart", "expected default values plus at least three ci/ value sets")
for name, values in value_sets:
    report = helm.lint(chart_dir, values, strict=True, namespace="dlengine-system")
    for message in report.get("messages", []):
        if message.get("severity", 0) >= 2:
            fail(f"helm lint {name}", f"{message.get('path')}: {message.get('error')}")
    for error in report.get("errors") or []:
        fail(f"helm lint {name}", error)
    chart.validate_schema(values)
    manifests = chart.render(values, name="dlengine", namespace="dlengine-system", is_install=True)
    kinds = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        for obj in documents(text):
            kinds.append(obj["kind"])
            validate_object(obj, f"{name}: {template} {obj['kind']}/{obj['metadata']['name']}")
    print(f"{name}: {len(kinds)} objects: {', '.join(sorted(set(kinds)))}")
    if name.startswith("bundled-etcd") and "StatefulSet" not in kinds:
        fail(name, "bundled etcd values render no etcd StatefulSet")
    if name.startswith("servicemonitor") and "ServiceMonitor" not in kinds:
        fail(name, "ServiceMonitor values render no ServiceMonitor")
    if name.startswith("external-etcd") and "Role" not in kinds:
        fail(name, "a watched namespace must get a Role, not cluster-wide rights")
try:
    chart.validate_schema({"replicaCount": "two"})
    fail("values.schema.json", "accepted replicaCount: two")
except helm.HelmError:
    pass
for crd_file in glob.glob(f"{chart_dir}/crds/*.yaml"):
    for obj in documents(open(crd_file).read()):
        validate_builtin(obj, crd_file)

print(f"{checked} manifests validated against Kubernetes {', '.join(VERSIONS)} and the CRD schemas")
if failures:
    print(f"{len(failures)} failures")
    sys.exit(1)
PY
echo "operator manifests: ok"
