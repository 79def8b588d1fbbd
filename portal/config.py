"""Settings: environment variables ``PORTAL_*``, an optional YAML file, embedded defaults.

Precedence (highest first): keyword arguments (CLI flags), ``PORTAL_*`` environment variables,
the YAML file named by ``PORTAL_CONFIG_FILE``, the defaults below.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .launchers.k8s_settings import KubernetesSettings


SECRET_FIELDS = frozenset({"oidc_client_secret", "session_secret", "git_token", "inference_api_key"})
CATALOG_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # org/name
# Keys of gpu_memory_gb: LLaMA-Factory's fine-tuning methods, plus qlora (lora on a 4/8-bit model).
GPU_HINT_METHODS = ("lora", "qlora", "full", "freeze", "oft")


def default_data_root() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "llamaboard-portal"


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by PORTAL_CONFIG_FILE (a ConfigMap in Kubernetes)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("PORTAL_CONFIG_FILE")
        if not path:
            return {}
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the portal config file must be a YAML mapping")
        secrets_in_file = sorted(k for k in data if k in SECRET_FIELDS)
        if secrets_in_file:
            env = ", ".join(f"PORTAL_{k.upper()}" + ("" if k == "session_secret" else "(_FILE)") for k in secrets_in_file)
            raise ValueError(f"{path}: {', '.join(secrets_in_file)} must not be in the config file (it ends up in Git "
                             f"and ConfigMaps): set {env} in the environment instead")
        return data


class CatalogModel(BaseModel):
    """One base model the admin offers in the form (``models:`` in the config file, or PORTAL_MODELS).

    The template name is checked against LLaMA-Factory's templates by ``portal.catalog.Catalog``
    (this module does not import LLaMA-Factory).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)  # shown in the form's model list
    path: Path | None = None  # a pre-downloaded folder; relative: under the shared models root
    hub_id: str | None = None  # org/name, fetched by the job (through HF_ENDPOINT when set)
    template: str | None = None  # LLaMA-Factory chat template the form picks with the model
    license: str | None = None  # a note shown to users
    gpu_memory_gb: dict[str, float] = Field(default_factory=dict)  # method -> GB hint, e.g. {lora: 18}
    trust_remote_code: bool = False  # the admin approved the model's own code

    @staticmethod
    def _label(info: ValidationInfo) -> str:
        name = info.data.get("name")
        return f"models entry '{name}'" if name else "models entry"

    @field_validator("name")
    @classmethod
    def _name_stripped(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("models entry: name must not be blank")
        return value.strip()

    @field_validator("hub_id")
    @classmethod
    def _hub_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (not CATALOG_HUB_ID.match(value) or ".." in value):
            raise ValueError(f"{cls._label(info)}: hub_id '{value}' is not a Hugging Face id of the form org/name")
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"{cls._label(info)}: template must not be blank (leave it out instead)")
        return value

    @field_validator("gpu_memory_gb")
    @classmethod
    def _gpu_hints(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        unknown = sorted(k for k in value if k not in GPU_HINT_METHODS)
        if unknown:
            raise ValueError(f"{cls._label(info)}: gpu_memory_gb has unknown method(s) {', '.join(unknown)} "
                             f"(use {', '.join(GPU_HINT_METHODS)})")
        if any(v <= 0 for v in value.values()):
            raise ValueError(f"{cls._label(info)}: gpu_memory_gb values must be positive numbers of GB")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "CatalogModel":
        if (self.path is None) == (self.hub_id is None):
            got = "both" if self.path is not None else "neither"
            raise ValueError(f"models entry '{self.name}': set exactly one of path or hub_id (got {got})")
        return self

    @property
    def source(self) -> str:
        """What goes in model_name_or_path: the folder or the hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)

    def note(self) -> str:
        """The license note and GPU memory hints, as one line for the form."""
        parts = []
        if self.license:
            parts.append(f"License: {self.license}")
        if self.gpu_memory_gb:
            hints = ", ".join(f"{method} ~{gb:g} GB" for method, gb in self.gpu_memory_gb.items())
            parts.append(f"GPU memory: {hints}")
        return " · ".join(parts)


class Settings(BaseSettings):
    # hide_input_in_errors: a startup error must not print the client secret it was given
    model_config = SettingsConfigDict(env_prefix="PORTAL_", env_nested_delimiter="__", extra="forbid",
                                      hide_input_in_errors=True)

    data_root: Path = Field(default_factory=default_data_root)
    host: str = "127.0.0.1"
    port: int = 7860
    database_url: str | None = None  # default: sqlite file under the data root
    auth_mode: Literal["none", "oidc"] = "none"
    local_username: str = "local"
    # OIDC (auth_mode: oidc). The client secret comes from the env or a file, never a config file in Git.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None
    oidc_client_secret_file: Path | None = None
    oidc_scopes: str = "openid email profile"
    oidc_username_claim: str = "preferred_username"  # falls back to the email's local part, then sub
    oidc_groups_claim: str = "groups"
    oidc_admin_group: str | None = None
    public_url: str | None = None  # how browsers reach the portal, e.g. https://llm.bank.example
    session_secret: SecretStr | None = None  # None: a key made once and kept in <data root>/session.key
    session_idle_minutes: int = Field(default=120, ge=1)
    session_max_hours: int = Field(default=12, ge=1)
    # Behind a reverse proxy (docs/admin-guide.md "Reverse proxy and sub-path"; decision 0017).
    root_path: str = ""  # the sub-path the proxy serves the portal under, e.g. /llm; "" = the host's root
    trusted_proxies: list[str] = Field(default_factory=list)  # IPs/CIDRs whose X-Forwarded-For/-Proto count
    # Rate limits per client address, in this process's memory (each replica counts its own):
    # HTTP 429 with Retry-After for rate_limit_window_seconds once a limit is reached; None: no limit.
    rate_limit_window_seconds: int = Field(default=300, ge=1)
    rate_limit_login_starts: int | None = Field(default=60, ge=1)  # GET /login per address and window
    rate_limit_failed_logins: int | None = Field(default=10, ge=1)  # refused /auth/callback per address and window
    rate_limit_bad_tokens: int | None = Field(default=20, ge=1)  # unknown/revoked API tokens on /api, /v1

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: '{entry}' is not an IP address or network (e.g. 10.0.0.5 or "
                                 "10.0.0.0/24); list the reverse proxy's own addresses, as JSON: "
                                 "PORTAL_TRUSTED_PROXIES='[\"10.0.0.5\"]'") from None
        return [entry.strip() for entry in value]

    @model_validator(mode="after")
    def _sub_path(self) -> "Settings":
        from urllib.parse import urlsplit

        root = self.root_path.strip().rstrip("/")
        if root and (not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", root) or "/." in root):
            raise ValueError(f"root_path '{self.root_path}' must be a path like /llm or /teams/llm (letters, digits, "
                             "'.', '_', '~', '-'; no '..')")
        if root.split("/")[1:2] and root.split("/")[1] in ("ui", "api", "v1", "login", "logout", "auth", "healthz"):
            raise ValueError(f"root_path '{root}' starts with one of the portal's own routes: choose another "
                             "prefix, e.g. /llm")
        if self.public_url:
            parts = urlsplit(self.public_url.strip())
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"public_url '{self.public_url}' must be an http(s) URL like https://llm.bank.example")
            path = parts.path.rstrip("/")
            if path and not root:
                root = path  # the public URL names the sub-path: that is the root path
            elif path and path != root:
                raise ValueError(f"public_url '{self.public_url}' has the path '{path}' but root_path is '{root}': "
                                 f"make them the same (PORTAL_ROOT_PATH={path}, or drop the path from public_url)")
            self.public_url = f"{parts.scheme}://{parts.netloc}{root}"  # always ends with the root path
        self.root_path = root
        return self

    launcher: Literal["local", "kubernetes"] = "local"
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)  # launcher: kubernetes
    max_concurrent_runs: int = Field(default=2, ge=1)
    gpus: list[int] | None = None  # None: detect with nvidia-smi; [] forces CPU
    gpus_per_run: int = Field(default=1, ge=0)
    max_runs_per_user: int | None = Field(default=None, ge=1)  # running at once; admins exempt; None: no limit
    max_gpus_per_user: int | None = Field(default=None, ge=0)  # GPUs held at once; admins exempt
    cancel_grace_seconds: float = Field(default=10.0, ge=0)
    dispatch_interval_seconds: float = Field(default=1.0, gt=0)

    mlflow_tracking_uri: str | None = None  # None: the portal starts its own server
    mlflow_port: int = 5050
    mlflow_experiment: str = "llamaboard-portal"
    mlflow_public_url: str | None = None  # link shown to users; defaults to the tracking URI
    metrics_refresh_seconds: float = Field(default=2.0, gt=0)

    allow_hub_models: bool = True
    # The base models offered in the form (see CatalogModel); folders under the shared models root
    # that no entry names are offered too, under their folder name.
    models: list[CatalogModel] = Field(default_factory=list)
    # The config-key policy on top of the built-in one (portal/policy.py FORBIDDEN_KEYS):
    # more keys to refuse, each with what to do instead, and built-in refusals to lift.
    # Keys carrying credentials can never be lifted.
    policy_forbidden_keys: dict[str, str] = Field(default_factory=dict)
    policy_allowed_keys: list[str] = Field(default_factory=list)
    job_cpus: int | None = None  # preprocessing workers per job; None: the machine's cores / concurrency
    # chat with a run: one OpenAI-compatible server per run on this machine (llamafactory-cli api)
    chat_max_servers: int = Field(default=2, ge=1)  # the least recently used one stops for a new one
    chat_idle_seconds: float = Field(default=900.0, gt=0)  # a server unused this long is stopped
    chat_gpus: list[int] = Field(default_factory=list)  # GPUs for chat servers; [] runs them on the CPU
    # A shared OpenAI-compatible inference endpoint (vLLM), e.g. http://vllm.ml.svc:8000/v1 (decision 0020):
    # its models are chat targets for everyone, and runs on a base model it serves chat through it.
    inference_base_url: str | None = None
    inference_api_key: SecretStr | None = None  # env or file, never the YAML file; never sent to a browser
    inference_api_key_file: Path | None = None
    inference_runtime_lora: bool = True  # load runs' adapters (vLLM --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    inference_adapter_root: str | None = None  # where the endpoint mounts the data root; None: the same path
    inference_adapter_prefix: str = Field(default="run-", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,30}$")  # <prefix><id>
    inference_max_adapters: int = Field(default=8, ge=1)  # loaded at once by this portal; LRU unloaded beyond
    inference_timeout_seconds: float = Field(default=120.0, gt=0)  # first token, and between tokens
    max_upload_mb: int = Field(default=512, ge=1)  # dataset uploads (browser and CLI); Gradio refuses larger ones
    max_dataset_rows: int | None = Field(default=2_000_000, ge=1)  # rows per dataset file; None: no limit
    # Export configs to Git and import them back (portal/git_export.py, decision 0014).
    git_url: str | None = None  # a folder, file://, https:// or ssh URL, without credentials; None: no export
    git_branch: str = "main"  # the base branch: new branches start from it, the import picker reads it
    # user: push to portal/<user>; per_export: a new portal/<user>/<name>-<yyyymmdd-hhmmss>; base: git_branch
    git_branch_mode: Literal["user", "per_export", "base"] = "user"
    # placeholders: {dataset} {model} {name} {user} {stage} {finetuning_type}, each made one safe segment
    git_path_template: str = "experiments/{dataset}/{model}/{name}.yaml"
    git_import_prefix: str = "experiments"  # the folder the import picker lists
    git_username: str | None = None  # HTTPS user for the token; None: oauth2
    git_token: SecretStr | None = None  # HTTPS token, also for the merge request API; env or file, never the YAML file
    git_token_file: Path | None = None
    git_ssh_key_file: Path | None = None  # private key for ssh URLs (a deploy key)
    git_ssh_known_hosts_file: Path | None = None  # the server's host key; None: ssh's own known_hosts
    git_committer_name: str = "LLaMA Board Portal"  # the author is the user who exports
    git_committer_email: str = "portal@localhost"
    # the link shown after an export, e.g. https://gitlab.example/ml/configs/-/commit/{sha}; also {branch} {path}
    git_commit_url_template: str | None = None
    git_merge_request: Literal["gitlab", "github"] | None = None  # open one per pushed branch (not in base mode)
    git_api_url: str | None = None  # e.g. https://gitlab.example/api/v4; GitHub: https://api.github.com
    git_project: str | None = None  # GitLab project id or path (ml/configs); GitHub owner/repo

    @model_validator(mode="after")
    def _git_export_settings(self) -> "Settings":
        from .git_export import check_git_settings

        check_git_settings(self)
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _YamlFileSource(settings_cls), file_secret_settings)

    def inference_key(self) -> str | None:
        """The inference endpoint's API key (env or file), or None when it needs none."""
        if self.inference_api_key is not None:
            return self.inference_api_key.get_secret_value()
        if self.inference_api_key_file is not None:
            try:
                return Path(self.inference_api_key_file).read_text(encoding="utf-8").strip() or None
            except OSError as err:
                raise ValueError(f"cannot read PORTAL_INFERENCE_API_KEY_FILE {self.inference_api_key_file}: "
                                 f"{err.strerror}") from None
        return None

    @model_validator(mode="after")
    def _oidc_complete(self) -> "Settings":
        if self.auth_mode == "oidc":
            missing = [name for name in ("oidc_issuer", "oidc_client_id") if not getattr(self, name)]
            if not (self.oidc_client_secret or self.oidc_client_secret_file):
                missing.append("oidc_client_secret (or oidc_client_secret_file)")
            if missing:
                env = ", ".join("PORTAL_" + m.split(" ")[0].upper() for m in missing)
                raise ValueError(f"auth_mode oidc needs {', '.join(missing)}: set {env}")
        return self

    @field_validator("policy_allowed_keys")
    @classmethod
    def _no_credentials_allowed(cls, value: list[str]) -> list[str]:
        from .policy import CREDENTIAL_KEYS

        refused = sorted(set(value) & CREDENTIAL_KEYS)
        if refused:
            raise ValueError(f"policy_allowed_keys may not lift {', '.join(refused)}: credentials never go in a "
                             "training config (the portal gives jobs their credentials itself)")
        return value

    @model_validator(mode="after")
    def _catalog_consistent(self) -> "Settings":
        names: set[str] = set()
        sources: dict[str, str] = {}
        fixed = []
        for entry in self.models:
            if entry.name in names:
                raise ValueError(f"models entry '{entry.name}': name is used by more than one entry; names must be unique")
            names.add(entry.name)
            if entry.path is not None:  # normalised; a relative path is under the shared models root
                entry = entry.model_copy(update={"path": Path(os.path.normpath(self.shared_models_root / entry.path))})
            field = "path" if entry.path is not None else "hub_id"
            if entry.source in sources:
                raise ValueError(f"models entry '{entry.name}': {field} {entry.source} is already the model of entry "
                                 f"'{sources[entry.source]}'; give each model one entry")
            sources[entry.source] = entry.name
            fixed.append(entry)
        for entry in fixed:  # a name that is another entry's hub id or folder would be ambiguous
            if sources.get(entry.name, entry.name) != entry.name:
                raise ValueError(f"models entry '{entry.name}': name is the model (hub_id or path) of entry "
                                 f"'{sources[entry.name]}'; choose another name")
        self.models = fixed
        return self

    def oidc_secret(self) -> str:
        if self.oidc_client_secret is not None:
            return self.oidc_client_secret.get_secret_value()
        if self.oidc_client_secret_file is not None:
            return Path(self.oidc_client_secret_file).read_text(encoding="utf-8").strip()
        raise ValueError("no OIDC client secret: set PORTAL_OIDC_CLIENT_SECRET or PORTAL_OIDC_CLIENT_SECRET_FILE")

    def session_key(self) -> str:
        """The key that signs session cookies: from settings, else made once under the data root."""
        if self.session_secret is not None:
            key = self.session_secret.get_secret_value()
            if len(key) < 32:
                raise ValueError("PORTAL_SESSION_SECRET is too short: use at least 32 random characters")
            return key
        path = self.data_root / "session.key"
        if path.is_file() and len(path.read_text().strip()) < 32:
            path.unlink()  # empty or truncated (a crash while it was written): make a new one
        if not path.is_file():
            import secrets

            self.data_root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"session.key.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
            try:
                os.link(tmp, path)  # first writer wins; a process starting at the same time reads its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip()

    @field_validator("data_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).expanduser().resolve()

    # ---- derived locations -------------------------------------------------------------
    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_root / 'portal.db'}"

    @property
    def users_root(self) -> Path:
        return self.data_root / "users"

    @property
    def shared_root(self) -> Path:
        return self.data_root / "shared"

    @property
    def shared_models_root(self) -> Path:
        return self.shared_root / "models"

    @property
    def shared_datasets_root(self) -> Path:
        return self.shared_root / "datasets"

    @property
    def mlflow_root(self) -> Path:
        return self.data_root / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def embedded_mlflow(self) -> bool:
        return self.mlflow_tracking_uri is None

    @cached_property
    def gpu_ids(self) -> list[int]:
        return list(self.gpus) if self.gpus is not None else detect_gpus()

    def ensure_dirs(self) -> None:
        for path in (self.data_root, self.users_root, self.shared_models_root, self.shared_datasets_root, self.mlflow_root):
            path.mkdir(parents=True, exist_ok=True)


def detect_gpus() -> list[int]:
    """GPU indices from nvidia-smi; an empty list (CPU jobs) when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [int(line) for line in out.stdout.split() if line.strip().isdigit()]
