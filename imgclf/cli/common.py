"""What every command group shares: flag types, the user-error rule, settings and the repository.

The rule: a user mistake (a bad flag, config key, ``IMGCLF_*`` value, path, model name) is one line on
stderr and exit code 2; ``imgclf -v`` adds the traceback. A bug is not a user mistake and keeps its
traceback. Nothing heavy is imported here, so ``imgclf --help`` stays fast and torch-free.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from pydantic import ValidationError

    from service.repository import Repository
    from service.settings import Settings

TRAIN_EXTRA_HINT = "this command needs the training extra: pip install 'imgclf[train]'"

# Exceptions that mean "the input was wrong", by where they are defined. They are matched only when
# their module is already imported (an exception of a class cannot exist before its module does), so
# listing training errors here costs a serving-only install nothing.
USER_ERRORS = (
    "service.repository:RepositoryError",  # unknown model or version, failed verification
    "service.preprocessing:ImageInputError",
    "service.runtime:SessionError",  # e.g. IMGCLF_DEVICE=cuda without a CUDA provider
    "service.batch.inputs:InputError",
    "service.batch.job_state:JobStateError",
    "training.config:ConfigError",
    "training.data:DataError",
    "training.models:WeightsUnavailableError",
    "training.export:ExportError",
    "training.pipeline.record:PipelineBusyError",
)


class CliError(Exception):
    """A user mistake, already worded: the message names the flag or variable and what is allowed."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


def one_line(text: str) -> str:
    """Multi-line messages (config errors list one key per line) joined into one line."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    out = ""
    for line in lines:
        out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user mistake, or None for anything else (a bug)."""
    if isinstance(exc, CliError):
        return one_line(str(exc))
    for dotted in USER_ERRORS:
        module, _, name = dotted.partition(":")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return one_line(str(exc))
    return None


def errors_exit(exc: BaseException, *, verbose: bool) -> NoReturn:
    """Report a user mistake as one line on stderr (after its traceback with -v) and exit 2."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    typer.secho(f"error: {user_error_message(exc) or exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def user_errors(*kinds: type[BaseException], describe: Callable[[Any], str] = str) -> Iterator[None]:
    """Treat these exception types as user mistakes inside the block (e.g. ValueError from parsing a
    flag), keeping the original as the cause so that -v shows where it came from."""
    try:
        yield
    except kinds as exc:
        raise CliError(describe(exc)) from exc


def validation_errors(exc: ValidationError, name: Callable[[tuple[Any, ...]], str]) -> str:
    """A pydantic error in one line, each problem named by ``name(loc)``; checks across fields (empty
    loc) name their fields in their own message."""
    parts = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{name(err['loc'])}: {msg}" if err["loc"] else msg)
    return "; ".join(parts)


def flag_errors(exc: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """Errors of options that flags set, naming the flag: ``--top-k: ...`` (``flags``: the exceptions)."""
    return validation_errors(exc, lambda loc: (flags or {}).get(str(loc[0]), "--" + str(loc[0]).replace("_", "-")))


def require_training() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as exc:
        fail(f"{TRAIN_EXTRA_HINT} ({exc})")


# --- settings and the model repository ---------------------------------------------------------------

REPO_FIELDS = ("model_repo", "repo_cache", "store_writes")


def settings(only: tuple[str, ...] | None, repo: str | Path | None = None, **flags: object) -> Settings:
    """Settings for one command: only the ``IMGCLF_*`` variables of ``only`` (None: all) are read, so a
    bad variable that a command does not use cannot stop it. Flags override their variables."""
    from pydantic import ValidationError

    from service.settings import Settings, format_settings_error

    try:
        return Settings.from_env(only=only, model_repo=repo, **flags)
    except ValidationError as exc:
        given = {k: "--" + k.replace("_", "-") for k, v in flags.items() if v is not None}
        raise CliError(format_settings_error(exc, given | ({"model_repo": "--repo"} if repo else {}))) from exc


def repository(repo: str | Path | None, *, must_exist: bool = True) -> Repository:
    """The model repository of --repo or IMGCLF_MODEL_REPO (a folder, or a URL through its local cache);
    reading commands need a folder to exist."""
    found = settings(REPO_FIELDS, repo)
    if must_exist and not found.repo_is_url and not Path(found.model_repo).is_dir():
        fail(f"no model repository at {found.model_repo} (set by --repo or IMGCLF_MODEL_REPO, default models/); "
             "create one with `imgclf bootstrap` or `imgclf export`")
    return found.repository()  # RepositoryError (e.g. s3:// without s3fs) is a user error: one line


def model_ref(text: str) -> Any:
    """NAME or NAME:VERSION, validated (no path can hide in it)."""
    from service.repository import ModelRef

    with user_errors(ValueError):
        return ModelRef.parse(text)


# --- flags shared by several commands ------------------------------------------------------------------

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file with any training hyperparameters")]
DataOpt = Annotated[str | None, typer.Option("--data", help="'digits', an ImageFolder directory or a CSV manifest")]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="architecture name (see `imgclf archs`)")]
PretrainedOpt = Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="start from ImageNet weights")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="local pretrained weights file (offline)")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="peak learning rate")]
SizeOpt = Annotated[int | None, typer.Option("--image-size", help="square model input size")]
SeedOpt = Annotated[int | None, typer.Option("--seed")]
RepoOpt = Annotated[str | None, typer.Option("--repo", help="model repository: a folder or a URL such as "
                                               "s3://bucket/prefix (default $IMGCLF_MODEL_REPO or models/)")]

# flag -> where it goes in the training config
_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data", "source"), "arch": ("model", "arch"), "pretrained": ("model", "pretrained"),
    "weights": ("model", "weights"), "image_size": ("model", "image_size"), "lr": ("optim", "lr"),
    "epochs": ("epochs",), "batch_size": ("batch_size",), "seed": ("seed",),
}


def train_overrides(**flags: Any) -> dict[str, Any]:
    """The training flags that were given (None: not given) as a nested config fragment:
    ``train_overrides(arch="lenet5", epochs=None)`` -> ``{"model": {"arch": "lenet5"}}``."""
    out: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        *sections, key = _TRAIN_KEYS[flag]
        target = out
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = str(value) if isinstance(value, Path) else value
    if flags.get("weights") is not None:  # a weights file means pretrained unless --no-pretrained says not
        out["model"].setdefault("pretrained", True)
    return out
