"""Service configuration: one pydantic model tree loaded from YAML.

Unknown keys are rejected, units live in field names, every field is described. Errors name the
YAML path, the line and the offending value; ``lineinspect check-config FILE`` exits 0 / 1.
Secrets (MQTT password) never live in the YAML: a file path or a systemd credential name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# station, cameras
# --------------------------------------------------------------------------------------------
class StationConfig(Strict):
    line: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="production line id (topic part)")
    station: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="station id (topic part)")
    description: str = Field("", description="free text shown in status messages")


class PartIdConfig(Strict):
    source: Literal["counter", "block_id", "mqtt"] = Field(
        "counter",
        description="counter: the frame sequence number; block_id: the camera's frame/block id (pylon chunk-like "
        "counter); mqtt: part ids sent by the PLC on <prefix>/<line>/<station>/cmd/part_id, used in order",
    )
    mqtt_wait_ms: int = Field(200, ge=0, description="with source mqtt: how long a frame waits for its part id")
    prefix: str = Field("", description="text put before every part id")


class ReconnectConfig(Strict):
    initial_ms: int = Field(500, ge=10, description="first wait before reopening a lost camera")
    max_ms: int = Field(10_000, ge=100, description="longest wait between reopen attempts (doubling back-off)")


class CameraBase(Strict):
    id: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="camera id (logs, verdicts)")
    part_id: PartIdConfig = Field(default_factory=PartIdConfig, description="where the part id of a frame comes from")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="reconnect back-off")
    grab_timeout_ms: int = Field(1000, ge=1, description="wait for one frame before checking the stop flag")


class FolderCamera(CameraBase):
    type: Literal["folder"] = Field(..., description="folder: replay image files")
    path: Path = Field(..., description="folder of images replayed in name order")
    rate_hz: float | None = Field(None, gt=0, description="frames per second (None: as fast as the line takes them)")
    loop: bool = Field(False, description="start again at the first image after the last one")


class OpenCVCamera(CameraBase):
    type: Literal["opencv"] = Field(..., description="opencv: USB, RTSP, GStreamer or video file")
    source: int | str = Field(..., description="USB index, RTSP/GStreamer URL or video file")
    width: int | None = Field(None, ge=1, description="requested frame width in pixels")
    height: int | None = Field(None, ge=1, description="requested frame height in pixels")
    fps: float | None = Field(None, gt=0, description="requested frame rate")


class TriggerConfig(Strict):
    mode: Literal["hardware", "software", "free_run"] = Field("hardware", description="how frames are started")
    line: str = Field("Line1", description="hardware: input line of the trigger signal")
    edge: Literal["rising", "falling"] = Field("rising", description="hardware: trigger edge")
    software_rate_hz: float | None = Field(
        None, gt=0, description="software: trigger at this rate (None: only on MQTT cmd/trigger)"
    )


class RoiConfig(Strict):
    x: int = Field(0, ge=0, description="offset x in pixels")
    y: int = Field(0, ge=0, description="offset y in pixels")
    width: int = Field(..., ge=1, description="width in pixels")
    height: int = Field(..., ge=1, description="height in pixels")


class PylonCamera(CameraBase):
    type: Literal["pylon"] = Field(..., description="pylon: Basler camera through pypylon")
    serial: str | None = Field(None, description="select the camera by serial number")
    user_id: str | None = Field(None, description="select the camera by its user-defined name")
    trigger: TriggerConfig = Field(default_factory=TriggerConfig, description="trigger settings")
    exposure_us: float | None = Field(None, gt=0, description="exposure time in microseconds (None: camera's)")
    gain_db: float | None = Field(None, ge=0, description="gain in dB (None: camera's)")
    pixel_format: Literal["Mono8", "BGR8", "BayerRG8", "BayerBG8", "BayerGR8", "BayerGB8"] | None = Field(
        None, description="pixel format (Bayer is converted to BGR)"
    )
    roi: RoiConfig | None = Field(None, description="region of interest on the sensor")
    buffer_count: int = Field(10, ge=1, le=256, description="grab buffers (MaxNumBuffer)")
    emulator_image_dir: Path | None = Field(
        None, description="camera emulator only: feed these image files (ImageFileMode) instead of test patterns"
    )

    @model_validator(mode="after")
    def _one_selector(self) -> PylonCamera:
        if self.serial and self.user_id:
            msg = "give serial or user_id, not both"
            raise ValueError(msg)
        return self


CameraConfig = Annotated[FolderCamera | OpenCVCamera | PylonCamera, Field(discriminator="type")]


# --------------------------------------------------------------------------------------------
# model, decision, mqtt, storage, metrics, logging
# --------------------------------------------------------------------------------------------
class ModelBase(Strict):
    bundle: Path = Field(..., description="model bundle folder (model.json, model.onnx)")
    warmup_runs: int = Field(3, ge=0, description="inferences run before READY=1")

    def runtime_options(self) -> dict[str, Any]:
        """Keyword options for ``engines.runtime.load_runtime``: exactly those this backend takes
        (the service and the wizard share them)."""
        skip = {"bundle", "warmup_runs", "backend"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class OnnxRuntimeModel(ModelBase):
    backend: Literal["onnxruntime"] = Field("onnxruntime", description="onnxruntime: CPU (or CUDA) ONNX Runtime")
    device: Literal["cpu", "cuda"] = Field("cpu", description="onnxruntime: execution provider")
    threads: int | None = Field(None, ge=1, description="CPU threads for the runtime (None: all cores)")


class OpenVinoModel(ModelBase):
    backend: Literal["openvino"] = Field(..., description="openvino: Intel/AMD CPUs and Intel GPUs")
    device: str = Field("CPU", min_length=1, description="openvino: device name (CPU, GPU, ...)")
    precision: Literal["f32", "bf16", "int8"] = Field(
        "f32", description="openvino: f32, bf16 (faster on CPUs that have it), int8 (after lineinspect quantize)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for the runtime (None: all cores)")


class TensorRtModel(ModelBase):
    backend: Literal["tensorrt"] = Field(
        ..., description="tensorrt: NVIDIA GPUs and Jetson (engine built on the target)"
    )
    device: int = Field(0, ge=0, description="tensorrt: CUDA device index")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp16", description="tensorrt: engine precision")


class TorchModel(ModelBase):
    backend: Literal["torch"] = Field(..., description="torch: the training stack (needs the train extra)")
    device: str = Field("cpu", description="torch: cpu, cuda or cuda:N")
    fp16: bool | None = Field(None, description="torch: run the networks in fp16 (None: on CUDA only)")
    cuda_graph: bool | None = Field(None, description="torch: capture a CUDA graph (None: on CUDA only)")


def _backend_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("backend", "onnxruntime")  # onnxruntime when the key is left out
    return getattr(value, "backend", None)


ModelConfig = Annotated[
    Annotated[OnnxRuntimeModel, Tag("onnxruntime")]
    | Annotated[OpenVinoModel, Tag("openvino")]
    | Annotated[TensorRtModel, Tag("tensorrt")]
    | Annotated[TorchModel, Tag("torch")],
    Discriminator(
        _backend_tag,
        custom_error_type="backend",
        custom_error_message="model.backend must be one of: onnxruntime, openvino, tensorrt, torch",
    ),
]


class CalibrationRef(Strict):
    file: Path = Field(..., description="calibration YAML written by 'lineinspect calibrate'")


class DecisionConfig(Strict):
    queue_size: int = Field(8, ge=1, le=1024, description="frames waiting for inspection; more become not_inspected")
    deadline_ms: float | None = Field(
        None, gt=0, description="a verdict later than this after the grab is sent as not_inspected (reason late)"
    )


class TlsConfig(Strict):
    ca_file: Path = Field(..., description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="client key (mutual TLS)")
    insecure_skip_hostname_check: bool = Field(False, description="do not check the broker's host name")


class MqttConfig(Strict):
    host: str = Field("127.0.0.1", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 usual with TLS)")
    tls: TlsConfig | None = Field(None, description="TLS settings (None: plain TCP)")
    username: str | None = Field(None, description="user name")
    password_file: Path | None = Field(None, description="file holding the password (never the password itself)")
    password_credential: str | None = Field(
        None, description="systemd credential name holding the password ($CREDENTIALS_DIRECTORY/NAME)"
    )
    client_id: str | None = Field(None, description="MQTT client id (None: lineinspect-<line>-<station>)")
    topic_prefix: str = Field("lineinspect", pattern=r"^[^#+]+$", description="first topic level(s)")
    qos: Literal[1, 2] = Field(1, description="QoS of verdict messages (at least once)")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds")
    reconnect_max_s: int = Field(10, ge=1, description="longest wait between reconnect attempts")
    stats_interval_s: float = Field(10.0, gt=0, description="period of the stats message")
    plain_payload: bool = Field(
        False, description="also publish '<part_id>;<verdict>' on .../result/plain for PLCs without JSON"
    )
    inflight_max: int = Field(50, ge=1, le=1000, description="verdicts published and awaiting their ack")
    late_after_s: float = Field(5.0, gt=0, description="a verdict published later than this is flagged late")

    @model_validator(mode="after")
    def _password_source(self) -> MqttConfig:
        if self.password_file and self.password_credential:
            msg = "give password_file or password_credential, not both"
            raise ValueError(msg)
        return self


class KeepConfig(Strict):
    ng: bool = Field(True, description="archive images of NG parts")
    not_inspected: bool = Field(True, description="archive images of not-inspected parts (when there is one)")
    ok_every: int = Field(0, ge=0, description="archive every N-th OK part (0: none)")


class StorageConfig(Strict):
    database: Path = Field(..., description="SQLite decision log (the MQTT outbox)")
    archive_dir: Path = Field(..., description="folder for archived images and heatmaps")
    quota_mb: float = Field(1024, gt=0, description="archive size limit; oldest files are deleted first")
    keep: KeepConfig = Field(default_factory=KeepConfig, description="what to archive")
    retention_days: float | None = Field(90, gt=0, description="delete delivered log rows older than this")


class MetricsConfig(Strict):
    enabled: bool = Field(True, description="serve Prometheus metrics")
    bind_address: str = Field("127.0.0.1", description="address of the metrics endpoint")
    port: int = Field(9108, ge=0, le=65535, description="port of the metrics endpoint (0: any free port)")


class HealthConfig(Strict):
    stall_s: float = Field(
        30.0, gt=0, description="connected to the broker, verdicts waiting, no ack for this long: degraded"
    )
    restart_after_s: float = Field(
        60.0, gt=0, description="delivery stuck this long: the watchdog stops so that systemd restarts the service"
    )
    store_restart_after_s: float | None = Field(
        600.0,
        gt=0,
        description="decision log unwritable this long (and no verdict held only in memory): restart "
        "(None: stay degraded, never restart for it)",
    )
    heartbeat_max_age_s: float = Field(10.0, gt=0, description="a service thread not turning for this long is stuck")


class WebTlsConfig(Strict):
    cert_file: Path = Field(..., description="certificate (PEM) the page is served with")
    key_file: Path = Field(..., description="private key (PEM) of that certificate")


class WebAuthConfig(Strict):
    users_file: Path | None = Field(
        None,
        description="file of 'name:secret' lines, one per user allowed to change the station; secret is a hash "
        "from 'lineinspect web-password' (or, discouraged, the password itself)",
    )
    users_credential: str | None = Field(
        None, description="systemd credential name holding that file ($CREDENTIALS_DIRECTORY/NAME)"
    )
    session_hours: float = Field(8.0, gt=0, le=168, description="a login lasts this long (one shift)")
    max_failures: int = Field(5, ge=1, description="wrong passwords from one address before it waits lockout_s")
    lockout_s: float = Field(60.0, ge=0, description="wait after max_failures wrong passwords")

    @model_validator(mode="after")
    def _one_source(self) -> WebAuthConfig:
        if self.users_file and self.users_credential:
            msg = "give users_file or users_credential, not both"
            raise ValueError(msg)
        return self


class WebConfig(Strict):
    enabled: bool = Field(True, description="serve the station page")
    bind_address: str = Field(
        "127.0.0.1",
        description="address of the page; 127.0.0.1 keeps it on this PC, 0.0.0.0 opens the read-only pages to the "
        "plant network (changes always need a login)",
    )
    port: int = Field(8080, ge=0, le=65535, description="port of the page (0: any free port)")
    tls: WebTlsConfig | None = Field(None, description="serve HTTPS with this certificate (None: plain HTTP)")
    auth: WebAuthConfig = Field(default_factory=WebAuthConfig, description="who may change the station")
    live_max_hz: float = Field(2.0, gt=0, le=30, description="live view updates per second per client, at most")
    max_clients: int = Field(16, ge=1, le=1000, description="live-view connections at once; more are refused")
    review_dir: Path | None = Field(
        None,
        description="where reviewed parts are collected (train/good: false rejects, test/confirmed: confirmed "
        "defects; the layout lineinspect train / calibrate read). None: <archive_dir>/../review",
    )
    whatif_parts: int = Field(1000, ge=10, le=1_000_000, description="recent logged parts the what-if counts")


class LoggingConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")


class ServiceConfig(Strict):
    station: StationConfig = Field(..., description="where this service sits on the line")
    cameras: list[CameraConfig] = Field(..., min_length=1, description="one or more cameras")
    model: ModelConfig = Field(..., description="the model bundle and runtime")
    calibration: CalibrationRef = Field(..., description="thresholds")
    decision: DecisionConfig = Field(default_factory=DecisionConfig, description="queueing and deadlines")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="broker connection and topics")
    storage: StorageConfig = Field(..., description="decision log and image archive")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint")
    health: HealthConfig = Field(default_factory=HealthConfig, description="when the service is degraded or restarted")
    web: WebConfig = Field(default_factory=WebConfig, description="the station page (live view, history, calibration)")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="logging")

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cams: list) -> list:
        ids = [c.id for c in cams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            msg = f"camera ids must be unique, repeated: {', '.join(dup)}"
            raise ValueError(msg)
        return cams


# --------------------------------------------------------------------------------------------
# loading with YAML line numbers
# --------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """Invalid configuration; ``problems`` lists (yaml path, line, message, value)."""

    def __init__(self, path: Path, problems: list[tuple[str, int | None, str, Any]]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {len(problems)} problem(s)"]
        for loc, line, msg, value in problems:
            where = f"line {line}" if line else "line ?"
            shown = "" if value is _MISSING else f" (value: {value!r})"
            lines.append(f"  {loc} ({where}): {msg}{shown}")
        super().__init__("\n".join(lines))


_MISSING = object()


def _node_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """YAML path (tuple of keys / indices) -> 1-based line number, for every node."""
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[(*prefix, key)] = k.start_mark.line + 1
            out.update(_node_lines(v, (*prefix, key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_node_lines(v, (*prefix, i)))
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    # pydantic adds the union tag (e.g. 'folder') into the location of discriminated unions: skip
    # parts that are not in the YAML, walking back to the nearest known parent.
    clean: list = []
    for part in loc:
        cand = (*clean, part)
        if cand in lines or isinstance(part, int):
            clean.append(part)
    for n in range(len(clean), -1, -1):
        if tuple(clean[:n]) in lines:
            return lines[tuple(clean[:n])]
    return None


def _yaml_loc(lines: dict[tuple, int], loc: tuple) -> tuple:
    """The location as the YAML spells it: union tags that pydantic inserts (``model.onnxruntime``) dropped."""
    out: list = []
    for part in loc:
        if (*out, part) in lines or isinstance(part, int) or part not in _UNION_TAGS:
            out.append(part)
    return tuple(out)


_BACKENDS = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel, "tensorrt": TensorRtModel, "torch": TorchModel}
_UNION_TAGS = {*_BACKENDS, "folder", "opencv", "pylon"}


def _explain(err: dict, loc: tuple) -> str:
    """pydantic's message, with the valid choices where it leaves them out."""
    if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "model" and loc[1] in _BACKENDS:
        options = ", ".join(sorted(set(_BACKENDS[loc[1]].model_fields) - {"backend"}))
        return f"backend {loc[1]} has no option {loc[2]!r}; its options: {options}"
    return err["msg"]


def load_config(path: Path) -> ServiceConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(path, [("<file>", None, f"cannot read: {exc.strerror or exc}", _MISSING)]) from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(
            path, [("<yaml>", line, f"not valid YAML: {getattr(exc, 'problem', exc)}", _MISSING)]
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(path, [("<root>", 1, "the file must be a mapping of sections", _MISSING)])
    lines = _node_lines(node) if node is not None else {}
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            shown = ".".join(str(p) for p in _yaml_loc(lines, loc))
            value = err.get("input", _MISSING) if err["type"] != "missing" else _MISSING
            if isinstance(value, dict):
                value = _MISSING
            problems.append((shown, _line_for(lines, loc), _explain(err, loc), value))
        raise ConfigError(path, problems) from exc


def secret_path(file: Path | None, credential: str | None, key: str) -> Path | None:
    """Where a secret lives: its file, or the systemd credential of that name ($CREDENTIALS_DIRECTORY);
    ``key`` is the config key named in the error (e.g. ``mqtt.password_credential``)."""
    if file:
        return Path(file)
    if credential:
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            msg = f"{key} {credential!r} set, but CREDENTIALS_DIRECTORY is not (run under systemd with LoadCredential=)"
            raise ValueError(msg)
        return Path(cred_dir) / credential
    return None


def read_secret(cfg: MqttConfig) -> str | None:
    """The MQTT password from its file or systemd credential; clear errors, never logged."""
    p = secret_path(cfg.password_file, cfg.password_credential, "mqtt.password_credential")
    if p is None:
        return None
    try:
        return p.read_text().rstrip("\r\n")
    except OSError as exc:
        msg = f"cannot read the MQTT password from {p}: {exc.strerror or exc}"
        raise ValueError(msg) from exc


def main_check_config(args) -> int:
    import sys

    try:
        cfg = load_config(Path(args.file))
        if not getattr(args, "schema_only", False):
            from edge_app.checks import deep_check

            problems = deep_check(cfg)
            if problems:
                lines = _node_lines(yaml.compose(Path(args.file).read_text()))
                raise ConfigError(
                    Path(args.file), [(".".join(map(str, loc)), _line_for(lines, loc), m, v) for loc, m, v in problems]
                )
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(
        f"{args.file}: OK (line {cfg.station.line}, station {cfg.station.station}, "
        f"{len(cfg.cameras)} camera(s), backend {cfg.model.backend})"
    )
    return 0
