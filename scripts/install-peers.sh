#!/usr/bin/env bash
# Installs the real proxy cores the integration tests run against (SPEC §5, issue 4):
#   - V2Ray 4.34 from Debian (`apt-get install v2ray`, the binary /usr/bin/v2ray);
#   - Xray, as the PyPI wheel `Xray-core` pinned below, in a venv at target/peers/venv
#     (the tests start it with `python -c 'import xray; xray.startFromJSON(…)'`);
#   - Prometheus from Debian (`apt-get install prometheus`: `prometheus` and `promtool`),
#     which checks deploy/prometheus/alerts.yml and the Grafana dashboard's queries.
# Idempotent: what is already installed at the right version is left alone, so running it
# again is cheap. Needs root only for the Debian package; it says so and stops otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so that a new release cannot change the tests under us (XRAY-FACTS.md).
XRAY_WHEEL="Xray-core==1.8.26.13"
VENV="target/peers/venv"

say() { echo "install-peers: $*"; }
die() {
	echo "install-peers: error: $*" >&2
	exit 1
}

# ---- V2Ray from Debian ----
find_v2ray() {
	local c
	for c in "$(type -P v2ray || true)" /usr/bin/v2ray; do
		if [ -n "$c" ] && [ -f "$c" ] && [ -x "$c" ]; then
			echo "$c"
			return 0
		fi
	done
	return 1
}
if V2RAY_BIN="$(find_v2ray)"; then
	say "v2ray already installed: $V2RAY_BIN ($(dpkg-query -W -f='${Version}' v2ray 2>/dev/null || echo 'not from dpkg'))"
else
	[ "$(id -u)" -eq 0 ] || die "v2ray is missing and installing it needs root: run 'sudo bash scripts/install-peers.sh' (or 'apt-get install -y v2ray' as root)"
	command -v apt-get >/dev/null 2>&1 || die "v2ray is missing and there is no apt-get to install it with (a Debian-based machine is expected)"
	say "apt-get update"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
	say "apt-get install -y v2ray"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends v2ray >/dev/null ||
		die "apt-get install v2ray failed"
	V2RAY_BIN="$(find_v2ray)" || die "apt-get installed v2ray, but there is no executable v2ray on PATH nor /usr/bin/v2ray"
	say "installed v2ray $(dpkg-query -W -f='${Version}' v2ray)"
fi
# Read all of it: `| head -n 1` would close the pipe early and fail under pipefail.
V2RAY_VERSION="$("$V2RAY_BIN" -version 2>&1)" || die "$V2RAY_BIN -version failed: $V2RAY_VERSION"
V2RAY_VERSION="${V2RAY_VERSION%%$'\n'*}"

# ---- Prometheus from Debian (prometheus, promtool) ----
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
	say "prometheus already installed: $(command -v prometheus) ($(dpkg-query -W -f='${Version}' prometheus 2>/dev/null || echo 'not from dpkg'))"
else
	[ "$(id -u)" -eq 0 ] || die "prometheus/promtool are missing and installing them needs root: run 'sudo bash scripts/install-peers.sh' (or 'apt-get install -y prometheus' as root)"
	command -v apt-get >/dev/null 2>&1 || die "prometheus is missing and there is no apt-get to install it with (a Debian-based machine is expected)"
	say "apt-get update"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
	say "apt-get install -y prometheus"
	# The package's service is not wanted: the tests start their own Prometheus.
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null ||
		die "apt-get install prometheus failed"
	if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
		systemctl disable --now prometheus >/dev/null 2>&1 || true
	fi
	command -v promtool >/dev/null 2>&1 || die "apt-get installed prometheus, but there is no promtool on PATH"
	say "installed prometheus $(dpkg-query -W -f='${Version}' prometheus)"
fi

# ---- setpriv and ss (issue 14) ----
# tests/it/bans_bite.rs runs the agent without CAP_NET_ADMIN under `setpriv`
# (util-linux); benches/cut.rs compares the agent's cut with `ss -K` (iproute2).
for pair in setpriv:util-linux ss:iproute2; do
	cmd="${pair%%:*}" pkg="${pair#*:}"
	if ! command -v "$cmd" >/dev/null 2>&1; then
		[ "$(id -u)" -eq 0 ] || die "$cmd is missing and installing $pkg needs root"
		say "apt-get install -y $pkg"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null ||
			die "apt-get install $pkg failed"
	fi
done

# ---- Xray from PyPI, in a venv ----
PY="$VENV/bin/python"
if [ -e "$VENV" ] && ! "$PY" -c '' >/dev/null 2>&1; then
	# A venv whose python is gone (python upgraded, half-made venv): make it again.
	say "$VENV is broken; making it again"
	rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
	command -v python3 >/dev/null 2>&1 || die "python3 is missing; the Xray core is a Python wheel"
	say "python3 -m venv $VENV"
	mkdir -p "$(dirname "$VENV")"
	python3 -m venv "$VENV" || die "python3 -m venv $VENV failed (Debian needs the python3-venv package)"
fi
installed="$("$PY" -m pip show Xray-core 2>/dev/null || true)"
if [[ "$installed" == *$'\n'"Version: ${XRAY_WHEEL#*==}"$'\n'* ]]; then
	say "$XRAY_WHEEL already installed in $VENV"
else
	say "pip install $XRAY_WHEEL into $VENV"
	"$PY" -m pip install --quiet --disable-pip-version-check "$XRAY_WHEEL" ||
		die "pip install $XRAY_WHEEL failed"
fi
"$PY" -c 'import xray' || die "the venv's python cannot 'import xray'"

say "v2ray: $V2RAY_BIN ($V2RAY_VERSION)"
say "prometheus: $(command -v prometheus), promtool: $(command -v promtool)"
say "xray:  $PY (Xray-core $("$PY" -c 'import xray; print(xray.__version__)'), $("$PY" --version 2>&1))"
say "for the tests: export CONNECTOR_XRAY_PYTHON=$(pwd)/$PY"
