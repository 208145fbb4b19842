#!/usr/bin/env bash
# Install lineinspect on a line PC (x86 + NVIDIA, CPU-only, or Jetson). Idempotent: re-running
# changes only what is missing or different.
#
#   sudo deploy/install.sh --station press3 [--bundle /path/to/bundle] [--dry-run] [--root DIR] [--skip-venv]
#
#   --dry-run    print every action, change nothing
#   --root DIR   install into DIR instead of / (a throwaway root for tests); systemctl/udevadm are skipped
#   --skip-venv  do not create the virtual environment (tests of the rest of the script)
set -euo pipefail

STATION="" BUNDLE="" DRY=0 ROOT="/" SKIP_VENV=0
SRC="$(cd "$(dirname "$0")/.." && pwd)"
while [ $# -gt 0 ]; do
    case "$1" in
        --station) STATION="$2"; shift 2 ;;
        --bundle) BUNDLE="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --root) ROOT="$2"; shift 2 ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$STATION" ] || { echo "install.sh: --station NAME is required" >&2; exit 2; }
[[ "$STATION" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "install.sh: station name '$STATION' has bad characters" >&2; exit 2; }
ROOT="${ROOT%/}"
R() { printf '%s%s' "$ROOT" "$1"; }   # path inside the target root

run() {   # run (or print) one action
    if [ "$DRY" = 1 ]; then echo "would: $*"; else echo "+ $*"; "$@"; fi
}
note() { echo "ok: $*"; }

OPT=/opt/lineinspect ETC=/etc/lineinspect VAR=/var/lib/lineinspect
REAL_ROOT=0; [ -z "$ROOT" ] && REAL_ROOT=1

# 1. platform -> extras
if [ -f "$(R /etc/nv_tegra_release)" ]; then PLATFORM=jetson; EXTRAS="trt,basler"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PLATFORM=nvidia; EXTRAS="trt,ort,basler"
else PLATFORM=cpu; EXTRAS="ort,openvino,basler"; fi
echo "platform: $PLATFORM (extras: $EXTRAS)"

# 2. user and group
if [ "$REAL_ROOT" = 1 ]; then
    if id lineinspect >/dev/null 2>&1; then note "user lineinspect exists"
    else run useradd --system --home-dir "$VAR" --shell /usr/sbin/nologin --groups video,plugdev lineinspect; fi
else
    for f in passwd group; do [ -f "$(R /etc/$f)" ] || run install -D -m 0644 /dev/null "$(R /etc/$f)"; done
    if grep -q '^lineinspect:' "$(R /etc/passwd)" 2>/dev/null; then note "user lineinspect exists"
    else
        run sh -c "echo 'lineinspect:x:990:990:lineinspect:$VAR:/usr/sbin/nologin' >> '$(R /etc/passwd)'"
        run sh -c "echo 'lineinspect:x:990:' >> '$(R /etc/group)'"
    fi
fi

# 3. directories
for d in "$OPT" "$ETC" "$VAR" "$VAR/$STATION"; do
    if [ -d "$(R "$d")" ]; then note "$d exists"; else run install -d -m 0755 "$(R "$d")"; fi
done
if [ -d "$(R "$ETC/credentials")" ]; then note "$ETC/credentials exists"; else run install -d -m 0700 "$(R "$ETC/credentials")"; fi

# 4. virtual environment with the right extras (Jetson: JetPack's TensorRT through system site packages)
VENV="$(R "$OPT/venv")"
if [ "$SKIP_VENV" = 1 ]; then note "venv skipped (--skip-venv)"
elif [ -x "$VENV/bin/lineinspect" ] && [ "$(cat "$VENV/.extras" 2>/dev/null)" = "$EXTRAS" ]; then note "venv with [$EXTRAS] exists"
else
    if [ "$PLATFORM" = jetson ]; then run python3 -m venv --system-site-packages "$VENV"
    else run python3 -m venv "$VENV"; fi
    run "$VENV/bin/python" -m pip install --upgrade pip
    run "$VENV/bin/python" -m pip install "$SRC[$EXTRAS]"
    run sh -c "echo '$EXTRAS' > '$VENV/.extras'"
fi

# 5. udev rules for Basler USB cameras
RULES=/etc/udev/rules.d/69-lineinspect-basler.rules
if cmp -s "$SRC/deploy/udev/69-lineinspect-basler.rules" "$(R "$RULES")" 2>/dev/null; then note "udev rules installed"
else
    run install -D -m 0644 "$SRC/deploy/udev/69-lineinspect-basler.rules" "$(R "$RULES")"
    if [ "$REAL_ROOT" = 1 ] && command -v udevadm >/dev/null 2>&1; then run udevadm control --reload-rules; fi
fi

# 6. station config (never overwritten) and the credential file placeholder
CONF="$ETC/$STATION.yaml"
if [ -f "$(R "$CONF")" ]; then note "$CONF exists (kept)"
else run install -m 0640 "$SRC/deploy/config.example.yaml" "$(R "$CONF")"; echo "edit $CONF, then: lineinspect check-config $CONF"; fi
CRED="$ETC/credentials/$STATION.mqtt-password"
if [ -f "$(R "$CRED")" ]; then note "$CRED exists"
else run install -m 0600 /dev/null "$(R "$CRED")"; echo "put the MQTT password into $CRED"; fi

# 7. TensorRT engine, built on this device (never copied from another GPU)
if [ -n "$BUNDLE" ]; then
    if [ "$PLATFORM" != cpu ] && [ "$SKIP_VENV" = 0 ] && "$VENV/bin/python" -c "import tensorrt" 2>/dev/null; then
        run "$VENV/bin/lineinspect" build-engine --bundle "$BUNDLE" --fp16
    else note "no TensorRT here: the service uses ONNX Runtime / OpenVINO"; fi
fi

# 8. systemd unit
UNIT=/etc/systemd/system/lineinspect@.service
if cmp -s "$SRC/deploy/systemd/lineinspect@.service" "$(R "$UNIT")" 2>/dev/null; then note "unit installed"
else
    run install -D -m 0644 "$SRC/deploy/systemd/lineinspect@.service" "$(R "$UNIT")"
    CHANGED_UNIT=1
fi
if [ "$REAL_ROOT" = 1 ] && [ -d /run/systemd/system ]; then
    [ "${CHANGED_UNIT:-0}" = 1 ] && run systemctl daemon-reload
    run systemctl enable "lineinspect@$STATION.service"
    echo "start it after editing the config: systemctl start lineinspect@$STATION"
else
    note "systemd not running here (or --root): enable later with systemctl enable --now lineinspect@$STATION"
fi
echo "done"
