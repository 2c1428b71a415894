"""The ``edgekit`` command: a thin click layer over :mod:`edgekit.api`."""

from __future__ import annotations

import os
import sys

import click

from edgekit import __version__
from edgekit.errors import EdgekitError


class _Group(click.Group):
    """Turns EdgekitError into ``error: <what> (<where>). To resolve, <how>.`` + exit 2."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) or os.environ.get("EDGEKIT_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except EdgekitError as exc:
            if debug:
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `edgekit stages | head`: the reader left; not an error
            sys.stderr.close()
            ctx.exit(0)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug, not bad input: say so, keep the trace for --debug
            if debug:
                raise
            click.echo(
                f"error: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                "To resolve, rerun with --debug and report the traceback.",
                err=True,
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def main(debug: bool) -> None:
    """Turn a Hugging Face LLM into deployable edge artifacts.

    Start with: edgekit compress recipes/smollm2_to_orin_nano.yaml
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Run directory (default: the recipe's 'output' or runs/<name>).")
@click.option("--force", is_flag=True, help="Rerun every stage, ignoring cached results.")
@click.option("--from", "from_stage", metavar="STAGE", help="Rerun from this stage on (earlier stages must be cached).")
@click.option("--until", "until_stage", metavar="STAGE", help="Stop after this stage.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def compress(recipe: str, output: str | None, force: bool, from_stage: str | None, until_stage: str | None, quiet: bool) -> None:
    """Run a recipe's stages (resuming from cached results)."""
    from edgekit import api

    manifest = api.compress(recipe, output=output, force=force, from_stage=from_stage, until_stage=until_stage, quiet=quiet)
    _print_run(manifest, output)


_SHOWN_METRICS = (
    "perplexity", "perplexity_tensorrt", "parameters", "method", "bits_per_weight", "logits_max_abs_diff",
    "logits_max_abs_diff_tensorrt", "onnx_bytes", "bundle_bytes", "bundle",
    "parameters_after", "parameter_fraction", "perplexity_start", "perplexity_end", "steps", "tokens_per_second",
)


def _print_run(manifest: dict, output: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest['recipe']['name']} → {manifest['target']}")
    for column in ("stage", "type", "status", "seconds", "key metrics"):
        table.add_column(column)
    for stage in manifest["stages"]:
        metrics = stage.get("metrics") or {}
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in _SHOWN_METRICS
        )
        seconds = f"{stage['seconds']:.1f}" if "seconds" in stage else ""
        table.add_row(stage["name"], stage["type"], stage["status"], seconds, shown)
    console = Console()
    console.print(table)


@main.group()
def recipe() -> None:
    """Check and inspect recipe files."""


@recipe.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def recipe_validate(file: str) -> None:
    """Validate a recipe: keys, stage parameters and order, target, model and data paths."""
    from edgekit import api

    loaded = api.validate_recipe(file)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    stages = " → ".join(spec.name for spec in loaded.recipe.stages)
    click.echo(f"{file}: valid ({loaded.recipe.name}: {stages})")


@recipe.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
def recipe_show(file: str, as_json: bool) -> None:
    """Print the fully resolved recipe, every default filled in."""
    from edgekit import api

    click.echo(api.show_recipe(file, fmt="json" if as_json else "yaml"), nl=False if not as_json else True)


@main.group()
def targets() -> None:
    """Target device profiles."""


@targets.command("list")
def targets_list() -> None:
    """List the built-in target profiles."""
    from rich.console import Console
    from rich.table import Table

    from edgekit import api
    from edgekit.targets import target_table

    rows = target_table(api.list_targets())
    table = Table()
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print one target profile (name or YAML path) in full."""
    from edgekit import api
    from edgekit.yamlio import dump_yaml

    click.echo(dump_yaml(api.show_target(name).model_dump(mode="json")), nl=False)


@main.command("stages")
def stages_cmd() -> None:
    """List the stage types a recipe can use, with their parameters."""
    from edgekit import api

    for stage in api.list_stages():
        status = "" if stage.available else f"  [designed, lands with {stage.planned_in}]"
        click.echo(f"{stage.type}: {stage.summary}{status}")
        for name, field in stage.config.model_fields.items():
            default = field.get_default(call_default_factory=True)
            click.echo(f"    {name} = {default!r}  {field.description or ''}".rstrip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
