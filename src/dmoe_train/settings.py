"""Settings refused where their typed config is built, and config presets read as plain
settings. A typed config (a frozen dataclass with `__post_init__`) knows its own field names,
never where a config file puts it: it raises `SettingError("top_p", "=1.5: must be in (0, 1]")`,
and whoever builds it from a config group names the group (`settings_of("router")`), so the
user reads `router.top_p=1.5: ...`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from dmoe_train.locations import CONFIG_DIR


class SettingError(ValueError):
    """`key` (as its typed config names it) and what follows it in the message (`=value: why`)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}{detail}")
        self.key, self.detail = key, detail

    def within(self, group: str) -> SettingError:
        """The same refusal under the config group that holds the setting."""
        return SettingError(f"{group}.{self.key}", self.detail)


def refuse(key: str, value: object, requirement: str) -> SettingError:
    """The usual refusal: `key=value: requirement`."""
    return SettingError(key, f"={value}: {requirement}")


@contextmanager
def settings_of(group: str) -> Iterator[None]:
    """A typed config built inside (directly, or by Hydra's `instantiate`) that refuses a
    setting raises it again under `group`."""
    try:
        yield
    except SettingError as err:
        raise err.within(group) from None
    except InstantiationException as err:
        if isinstance(err.__cause__, SettingError):
            raise err.__cause__.within(group) from None
        raise


def preset(group: str, name: str) -> dict:
    """The settings of the preset `configs/<group>/<name>.yaml`, as written there."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        raise ValueError(f"{group}={name!r}: no such preset (one of {names})")
    return OmegaConf.to_container(OmegaConf.load(path))
