"""The ``edgekit`` command: a thin click layer over :mod:`edgekit.api`."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from edgekit import __version__
from edgekit.engine.options import MAX_BATCH, BuildEngineOptions, BuildOptions
from edgekit.errors import EdgekitError
from edgekit.runtime.answers import MAX_STOP_CHARS, MAX_STOPS
from edgekit.runtime.config import CALIBRATABLE, RuntimeConfig, SamplingConfig, bounds, choices, is_int


class _Finite(click.FloatRange):
    """A float within bounds, and finite: click's FloatRange lets 'nan' through (it compares
    False with every bound) and 'inf' through an open upper bound."""

    name = "finite number"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# Bounds of every numeric option: far beyond any real use, small enough that no option can ask
# for an absurd allocation or a loop that never ends.
MAX_TOKENS = 1 << 20  # context, prompt and generation lengths
MAX_STREAMS = 1024


class _Group(click.Group):
    """Turns EdgekitError into ``error: <what> (<where>). To resolve, <how>.`` + exit 2, and
    click's own usage errors (a missing or out-of-range option) into the same one line."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "edgekit"
            error = EdgekitError(exc.format_message(), where=where, how=f"see `{where} --help`")
            click.echo(f"error: {error.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        # without standalone mode click returns ctx.exit()'s code, or the command's return value
        sys.exit(result if isinstance(result, int) else 0)

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
@click.option("--proxy", is_flag=True, help="Run the same recipe on a tiny random model of the same architecture family "
              "and a local text, stage costs scaled down, into runs/<name>-proxy (CI; see docs/proxy.md).")
def compress(recipe: str, output: str | None, force: bool, from_stage: str | None, until_stage: str | None, quiet: bool,
             proxy: bool) -> None:
    """Run a recipe's stages (resuming from cached results)."""
    from edgekit import api

    manifest = api.compress(recipe, output=output, force=force, from_stage=from_stage, until_stage=until_stage, quiet=quiet,
                            proxy=proxy)
    _print_run(manifest, output)


_SHOWN_METRICS = (
    "perplexity", "perplexity_tensorrt", "parameters", "method", "bits_per_weight", "logits_max_abs_diff",
    "logits_max_abs_diff_tensorrt", "onnx_bytes", "bundle_bytes", "bundle",
    "parameters_after", "parameter_fraction", "perplexity_start", "perplexity_end", "steps", "tokens_per_second",
)


def _set_line(label: str, score: dict) -> str:
    def number(key: str, fmt: str) -> str:
        value = score.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"

    line = f"{label}: perplexity={number('perplexity', '.4g')}"
    if "agreement" in score:
        line += f" agreement={number('agreement', '.3f')} kl={number('kl', '.4g')}"
    return line


def _print_run(manifest: dict, output: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{manifest['recipe']['name']} → {manifest['target']}")
    for column in ("stage", "type", "status", "seconds", "key metrics"):
        table.add_column(column)
    for stage in manifest["stages"]:
        metrics = stage.get("metrics") or {}
        sets = metrics.get("sets") if isinstance(metrics.get("sets"), dict) else None
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in _SHOWN_METRICS and not (sets and k == "perplexity")  # an evaluate stage: per set below
        )
        if sets:  # every held-out set, labelled: perplexity, and top-1 agreement / KL to the teacher
            shown = "; ".join([_set_line(label, score) for label, score in sets.items() if isinstance(score, dict)]
                              + ([shown] if shown else []))
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
    """Validate a recipe: keys, stage parameters and order, target, model and data paths, and
    the whole chain at full scale from the model's config (pruned shape, distillation memory
    per GPU, group sizes after pruning, tokens, the engine against the target); prints it."""
    from edgekit import api

    loaded = api.validate_recipe(file)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    stages = " → ".join(spec.name for spec in loaded.recipe.stages)
    click.echo(f"{file}: valid ({loaded.recipe.name}: {stages})")
    chain = api.recipe_chain(loaded)
    if chain is None:
        click.echo("shape chain: not checked (the model's config.json is not available offline: it is checked when "
                   "the load stage has it)")
    else:
        click.echo(chain.table())


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


@main.command("plan")
@click.argument("source", metavar="RECIPE_OR_MODEL")
@click.option("--target", "-t", metavar="NAME", help="A target profile name or YAML path (default: the recipe's target; for a model: all).")
@click.option("--all-targets", is_flag=True, help="Plan for every built-in target.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--context", "context_length", type=click.IntRange(16, MAX_TOKENS), metavar="N", help="Context length (default: the recipe's, else 2048).")
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), metavar="N", help="Concurrent sequences (default: the recipe's build_engine max_batch, else 1).")
@click.option("--precision", metavar="P", help="Weight precision: fp16, bf16, fp8, int8, int4 (default: the recipe's quantize stage, else fp16).")
@click.option("--group-size", type=click.IntRange(1, 1 << 16), metavar="N", help="Input channels per scale for int8/int4 (default: the recipe's, else 128).")
@click.option("--power-mode", metavar="NAME", help="Power mode of the (single) target (default: its reference mode).")
@click.option("--prompt-tokens", type=click.IntRange(1, MAX_TOKENS), default=128, show_default=True, metavar="N", help="Prompt length the time to first token is predicted for.")
@click.option("--budget-ms", type=_Finite(0, 1e7, min_open=True), metavar="X", help="Latency budget per generated token (default: the recipe's latency_p99_ms).")
@click.option("--kv-fill", type=_Finite(0, 1), default=0.5, show_default=True, metavar="F", help="Fraction of the context in the KV cache at the decode step predicted.")
@click.option("--prefill-chunk", type=click.IntRange(1, MAX_TOKENS), metavar="N", help="Longest prompt one prefill call takes (default: the recipe's build_engine max_prefill, else 512).")
def plan_cmd(source: str, target: str | None, all_targets: bool, as_json: bool, context_length: int | None, batch: int | None,
             precision: str | None, group_size: int | None, power_mode: str | None, prompt_tokens: int, budget_ms: float | None,
             kv_fill: float, prefill_chunk: int | None) -> None:
    """Predict memory fit, decode speed and time to first token on each target, from the
    model's config alone (no weights), before any compression. Every number is a prediction."""
    import json

    from edgekit import api

    plan = api.plan(
        source, target=target, all_targets=all_targets, context_length=context_length, batch=batch,
        precision=precision, group_size=group_size, power_mode=power_mode, prompt_tokens=prompt_tokens,
        budget_ms=budget_ms, kv_fill=kv_fill, prefill_chunk=prefill_chunk,
    )
    if as_json:
        click.echo(json.dumps(plan, indent=2))
    else:
        _print_plan(plan)


def _print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    model, inputs = plan["model"], plan["inputs"]
    shape, fmt = model["shape"], inputs["weight_format"]
    bits = f"{fmt['linear_bits_per_weight']:g} bits/weight" + (f", group {fmt['group_size']}" if fmt["group_size"] else "")
    budget = inputs["budgets"]["latency_p99_ms"]
    title = (
        f"{model['spec']}: {shape['num_layers']} layers, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, "
        f"{model['parameters'] / 1e6:.1f}M parameters, {inputs['precision']} ({bits}), "
        f"context {inputs['context_length']}, batch {inputs['batch']}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("target", no_wrap=True)
    table.add_column("power mode", no_wrap=True)
    table.add_column("predicted memory\nGB / usable")
    table.add_column("predicted decode\nms/token (tok/s)")
    table.add_column(f"predicted TTFT ms\n{inputs['prompt_tokens']}-token prompt")
    if budget:
        table.add_column(f"predicted at\n{budget:g} ms/token budget")
        table.add_column("predicted deepest model\nwithin the budget", no_wrap=True)
    extrapolated = False
    for entry in plan["targets"]:
        if not entry["supported"]:
            table.add_row(entry["target"], "", f"{inputs['precision']} not supported", *([""] * (4 if budget else 2)))
            continue
        hw, memory, decode = entry["hardware"], entry["predicted_memory_gb"], entry["predicted_decode"]
        decode_flag = "*" if decode["extrapolated"] else ""
        prefill_flag = "*" if entry["predicted_prefill"]["extrapolated"] else ""
        extrapolated |= bool(decode_flag or prefill_flag)
        row = [
            entry["target"],
            f"{hw['power_mode']} {hw['memory_bandwidth_gbps']:g} GB/s",
            f"{memory['total']:.2f} / {hw['usable_memory_gb']:g} " + ("fits" if entry["predicted_fits"] else "DOES NOT FIT"),
            f"{decode['ms_per_token']:.3g} ({decode['tokens_per_s']:.3g}){decode_flag}",
            f"{entry['predicted_prefill']['ttft_ms']:.3g}{prefill_flag}",
        ]
        if budget:
            row.append("meets" if entry["predicted_within_budgets"]["latency_p99_ms"]["meets"] else "misses")
            largest = entry["predicted_largest_shape"]
            if largest["num_layers"] is None:
                row.append("none: 1 layer misses")
            else:
                params = largest["parameters"]
                size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
                row.append(f"{largest['num_layers']} layers, {size} ({'+'.join(largest['limited_by'])}-bound)")
        table.add_row(*row)
    # a pipe or file gets a fixed width wide enough for one row per target
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
    console.print(table)
    console.print(
        "All 'predicted' numbers are predictions from a roofline model with an efficiency fitted to published "
        "TensorRT-class figures (docs/planning.md), not measurements."
        + (" * outside the range of model sizes the efficiency was fitted on." if extrapolated else "")
    )



def _field_option(model, name: str):
    """The click option for the pydantic field ``name`` of ``model``: its flag, type, bounds,
    choices, default and help all come from the field, so the CLI cannot drift from the model.
    A bool is a flag (``--x/--no-x`` when it defaults on); ``--x-y`` for field ``x_y``."""
    import types
    import typing

    field = model.model_fields[name]
    flag = "--" + name.replace("_", "-")
    text = field.description + "."
    if not text.split()[0].endswith(":"):  # "auto: ..." names a choice and keeps its case
        text = text[:1].upper() + text[1:]
    bound = {key: getattr(item, key) for item in field.metadata for key in ("ge", "gt", "le", "lt") if hasattr(item, key)}
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`: the option may be left out
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if field.default:
            return click.option(f"{flag}/--no-{flag[2:]}", name, default=True, show_default=True, help=text)
        return click.option(flag, name, is_flag=True, default=False, help=text)
    if typing.get_origin(kind) is typing.Literal:
        kind = click.Choice(typing.get_args(kind))
    elif kind is int:
        kind = click.IntRange(bound.get("ge", bound.get("gt")), bound.get("le", bound.get("lt")),
                              min_open="gt" in bound, max_open="lt" in bound)
    elif kind is float:
        kind = _Finite(bound.get("ge", bound.get("gt")), bound.get("le", bound.get("lt")),
                       min_open="gt" in bound, max_open="lt" in bound)
    return click.option(flag, name, type=kind, default=field.default, show_default=field.default is not None, help=text)


def _model_options(model, *, around: tuple = ()):
    """Decorator: one option per field of ``model`` (in field order), after the ``around`` options."""

    def decorate(func):
        for option in reversed([*around, *(_field_option(model, name) for name in model.model_fields)]):
            func = option(func)
        return func

    return decorate


_ENGINE_SOURCE_OPTIONS = (
    click.option("--target", "-t", metavar="NAME", help="Target profile name or YAML path (default: the bundle's target)."),
    click.option("--context-length", type=click.IntRange(16, MAX_TOKENS), metavar="N", help="Decode profile's longest context (default: the bundle's)."),
)


def _build_options(kw: dict) -> BuildOptions:
    """The :class:`~edgekit.engine.options.BuildOptions` of a command's keyword arguments (their
    options were made from its fields; the rest is left in ``kw``)."""
    return BuildOptions(**{name: kw.pop(name) for name in BuildOptions.model_fields})


@main.command("build-engine")
@click.argument("path", metavar="BUNDLE_OR_ONNX", type=click.Path())
@_model_options(BuildEngineOptions, around=_ENGINE_SOURCE_OPTIONS)
@click.option("--backend", type=click.Choice(["tensorrt", "ort-tensorrt"]), default="tensorrt", show_default=True,
              help="tensorrt: the TensorRT Python API / trtexec; ort-tensorrt: ONNX Runtime's TensorRT EP builds and caches the engines.")
def build_engine_cmd(path: str, build: str, check: bool, backend: str, **kw) -> None:
    """Build a TensorRT engine for a target into a bundle (in place), or write everything needed
    to build it on the device (engine/<target>.trtexec.sh, build_engine.sh) when this machine
    cannot: an engine is tied to the GPU and TensorRT version it is built with."""
    from edgekit import api

    summary = api.build_engine(
        path, target=kw["target"], options=_build_options(kw), build=build, check=check,
        context_length=kw["context_length"], backend=backend, echo=lambda message: click.echo(message, err=True),
    )
    bundle = summary["bundle"]
    if summary.get("backend") == "ort-tensorrt":
        click.echo(f"{summary['target']}: ONNX Runtime TensorRT engines cached in {bundle}/{summary['cache']}/ "
                   f"({len(summary['files'])} files, {summary['build_seconds']} s)")
        return
    if "check_errors" in summary:
        click.echo(f"{summary['target']}: readiness check passed ({summary['check_warnings']} warning(s); "
                   f"{bundle}/engine/{summary['target']}.check.json)")
    if summary["status"] == "built":
        click.echo(f"{summary['target']}: built {bundle}/{summary['engine']} ({summary['engine_bytes'] / 2**20:.1f} MiB) with "
                   f"TensorRT {summary['tensorrt_version']} on {summary['device']} in {summary['build_seconds']} s")
    else:
        click.echo(f"{summary['target']}: not built here: {summary['reason']}")
    click.echo(f"  settings: {bundle}/{summary['settings']}")
    click.echo(f"  trtexec:  {bundle}/{summary['script']}")
    if summary["status"] != "built":
        click.echo(f"  on the device: cd {Path(bundle).name} && {summary['build_on_device']}")
    for note in summary.get("notes", []):
        click.echo(f"  note: {note}")


@main.command("check")
@click.argument("path", metavar="BUNDLE_OR_ONNX", type=click.Path())
@_model_options(BuildOptions, around=_ENGINE_SOURCE_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(path: str, as_json: bool, **kw) -> None:
    """Static TensorRT readiness checks of a bundle's graph for a target (opset, parser support,
    profiles, Q/DQ patterns, precisions, external data, engine memory). Runs anywhere, no GPU.
    Exit 1 when there is an error finding."""
    import json

    from edgekit import api

    report = api.check_tensorrt(path, target=kw["target"], options=_build_options(kw), context_length=kw["context_length"])
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{report['target']} (TensorRT {report['tensorrt']}): {report['onnx']} in {report['bundle']}")
        for finding in report["findings"]:
            click.echo(f"  {finding['severity']:<7} {finding['code']}: {finding['message']}")
            if finding["severity"] != "info" and finding["fix"]:
                click.echo(f"          fix: {finding['fix']}")
        verdict = "ready" if report["passed"] else "NOT ready"
        click.echo(f"{verdict}: {report['errors']} error(s), {report['warnings']} warning(s)")
    if not report["passed"]:
        sys.exit(1)



def _setting(model, name: str, *, cap: float | None = None) -> click.ParamType:
    """The click type of runtime setting ``name`` (edgekit.runtime.config): its choices, or its
    bounds; ``cap`` bounds what the model leaves open (or wide) so no option can ask for an
    absurd value."""
    values = choices(model, name)
    if values:
        return click.Choice(list(values))
    b = bounds(model, name)
    low, high = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if cap is not None:
        high = cap if high is None else min(high, cap)
    if is_int(model, name):
        return click.IntRange(low, high, min_open="gt" in b, max_open="lt" in b and high == b["lt"])
    return _Finite(low, high, min_open="gt" in b, max_open="lt" in b and high == b["lt"])


@main.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The prompt (plain text; no chat template is applied).")
@click.option("--policy", type=_setting(RuntimeConfig, "policy"), help="Routing policy (default: the bundle's runtime.json).")
@click.option("--large", metavar="BUNDLE_OR_URL", help="The large branch: a bundle directory or an OpenAI-compatible endpoint.")
@click.option("--backend", type=_setting(RuntimeConfig, "backend"), help="Local backend (default: the bundle's, auto).")
@click.option("--max-new-tokens", type=_setting(RuntimeConfig, "max_new_tokens"), help="Generation limit (default: the bundle's).")
@click.option("--temperature", type=_setting(SamplingConfig, "temperature"), help="0 = greedy (default: the bundle's).")
@click.option("--top-k", type=_setting(SamplingConfig, "top_k", cap=1 << 22))
@click.option("--top-p", type=_setting(SamplingConfig, "top_p"))
@click.option("--min-p", type=_setting(SamplingConfig, "min_p"))
@click.option("--repetition-penalty", type=_setting(SamplingConfig, "repetition_penalty"))
@click.option("--seed", type=_setting(SamplingConfig, "seed", cap=2**63 - 1))
@click.option("--draft-tokens", type=_setting(RuntimeConfig, "draft_tokens"), help="speculative: tokens drafted per round (default: the bundle's).")
@click.option("--draft-min-confidence", type=_setting(RuntimeConfig, "draft_min_confidence"),
              help="speculative: end a round early below this draft probability (default: the bundle's; 0 = never).")
@click.option("--reasoning", type=_setting(RuntimeConfig, "reasoning"),
              help="A reasoning model's <think> block: split = apart from the answer (dimmed on stderr; --json "
              "'reasoning'), off = as written (default: the bundle's, auto).")
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help=f"A stop sequence: the answer ends before it (repeatable, up to {MAX_STOPS} of 1-{MAX_STOP_CHARS} characters).")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
def run_cmd(bundle: str, prompt: str, policy, large, backend, max_new_tokens, temperature, top_k, top_p, min_p,
            repetition_penalty, seed, draft_tokens, draft_min_confidence, reasoning, stops: tuple[str, ...], stream: bool,
            as_json: bool) -> None:
    """Answer a prompt with the bundle: prints the answer on stdout (a reasoning model's
    thinking dimmed on stderr), which branch answered (and why), tokens/s and time to first
    token."""
    import json

    from edgekit import api

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                "repetition_penalty": repetition_penalty, "seed": seed}
    shown = {"reasoning": False}

    def on_event(event) -> None:
        if not stream or as_json:
            return
        if event.kind == "reasoning":
            click.echo(click.style(event.text, dim=True), nl=False, err=True)
            shown["reasoning"] = True
        elif event.kind == "text":
            if shown["reasoning"]:  # the thinking ends: the answer starts on stdout
                click.echo(err=True)
                shown["reasoning"] = False
            click.echo(event.text, nl=False)
        elif event.kind == "reset":
            click.echo(f"\n[{event.reason}; the answer restarts]", err=True)

    result = api.run_prompt(bundle, prompt, policy=policy, large=large, backend=backend, max_new_tokens=max_new_tokens,
                            sampling=sampling, on_event=on_event, draft_tokens=draft_tokens,
                            draft_min_confidence=draft_min_confidence, reasoning=reasoning, stop=list(stops) or None)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if stream:
        if shown["reasoning"]:
            click.echo(err=True)
        click.echo()
    else:
        if result.get("reasoning"):
            click.echo(click.style(result["reasoning"], dim=True), err=True)
        click.echo(result["text"])
    click.echo(_route_line(result), err=True)


def _route_line(result: dict) -> str:
    parts = [f"answered by {result['branch']} ({result['answered_by']})"]
    n = len(result["tokens"])
    if result.get("tokens_per_s"):
        parts.append(f"{n} tokens, {result['tokens_per_s']:.1f} tok/s")
    if result.get("ttft_s") is not None:
        parts.append(f"TTFT {result['ttft_s'] * 1000:.0f} ms")
    if result.get("acceptance_rate") is not None:
        parts.append(f"draft acceptance {result['acceptance_rate']:.2f}")
    policy = f"policy {result['policy']}"
    reason = result["reason"] or ""
    if reason.startswith(policy):  # the router's reason may open with the policy itself
        reason = reason[len(policy):].lstrip(";: ")
    parts.append(policy + (f": {reason}" if reason else ""))
    if result.get("fell_back"):
        parts.append("FELL BACK")
    return "[" + "; ".join(parts) + "]"


@main.command("calibrate-router")
@click.argument("bundle", type=click.Path())
@click.option("--large-rate", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Share of requests that should reach the large branch.")
@click.option("--policy", type=click.Choice(CALIBRATABLE), help="Default: the bundle's, else cascade.")
@click.option("--large", metavar="BUNDLE_OR_URL", help="The large branch to record (default: the bundle's).")
@click.option("--prompts", type=click.IntRange(4, 4096), default=64, show_default=True,
              help="Without --prompt-set: held-out prompts of the built-in text to fit on (as many again check the rate).")
@click.option("--prompt-set", metavar="FILE|builtin:routing-mixed",
              help="Prompts to calibrate on: a jsonl file ({\"prompt\", \"kind\", \"continuation\", \"split\"} a line) or "
              "builtin:routing-mixed (the default for --policy learned); fitted on its calibration half, checked on the other, "
              "reported per kind.")
@click.option("--hidden", type=click.IntRange(0, 64), default=8, show_default=True,
              help="learned: hidden units of the scorer (0: linear).")
@click.option("--max-new-tokens", type=_setting(RuntimeConfig, "max_new_tokens"), help="cascade: tokens generated per prompt while scoring (default: the bundle's).")
def calibrate_router_cmd(bundle: str, large_rate: float, policy, large, prompts: int, prompt_set, hidden: int,
                         max_new_tokens) -> None:
    """Pick the router threshold so that --large-rate of held-out prompts go to the large branch
    (quantile calibration on the small branch's scores; policy learned first trains its scorer
    with the large branch) and write it into the bundle's runtime.json."""
    from edgekit import api

    how = {"input_complexity": "one prefill each",
           "learned": "one pass of each branch per calibration prompt to train the scorer, then one small prefill each; "
                      "minutes"}.get(policy, "it generates each answer when the policy is cascade; minutes")
    what = prompt_set or ("builtin:routing-mixed" if policy == "learned" else f"{2 * prompts} held-out prompts")
    click.echo(f"scoring {what} with the small branch ({how})", err=True)

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            click.echo(f"  {done}/{total} calibration prompts through both branches", err=True)

    record = api.calibrate_router(bundle, large_rate=large_rate, policy=policy, large=large, prompts=prompts,
                                  max_new_tokens=max_new_tokens, prompt_set=prompt_set, hidden=hidden, progress=progress)
    click.echo(
        f"{record['policy']}: threshold {record['threshold']:.4g} sends {record['large_rate_achieved']:.1%} of "
        f"{record['n_prompts']} calibration prompts and {record['large_rate_held_out']:.1%} of {record['n_prompts_held_out']} "
        f"held-out prompts to the large branch (target {record['large_rate_target']:.0%}); written to {record['written']}"
    )
    for kind, row in (record.get("per_kind") or {}).items():
        cal, held = row["large_rate_calibration"], row["large_rate_held_out"]
        click.echo(f"  {kind}: large {'-' if cal is None else f'{cal:.0%}'} of {row['calibration_prompts']} calibration, "
                   f"{'-' if held is None else f'{held:.0%}'} of {row['held_out_prompts']} held-out prompts")
    if record.get("large_not_stored"):
        click.echo(f"  the large branch {record['large_not_stored']} lies outside the bundle, so runtime.json keeps its own "
                   f"policy and large branch: pass --policy {record['policy']} --large {record['large_not_stored']} to "
                   "edgekit run/serve (or put the large bundle inside this one)", err=True)


@main.command("keygen")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Private key file (PKCS#8 PEM, mode 0600); the public key is written to FILE.pub.")
@click.option("--public", type=click.Path(dir_okay=False), metavar="FILE", help="Public key file (default: FILE.pub).")
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keygen_cmd(out: str, public: str | None, force: bool) -> None:
    """Create an Ed25519 key pair for signing bundles (edgekit sign); devices trust the public key."""
    from edgekit import api

    record = api.keygen(out, public=public, force=force)
    click.echo(f"key id {record['key_id']}")
    click.echo(f"  private key: {record['private']} (mode 0600: keep it secret, e.g. as a CI secret)")
    click.echo(f"  public key:  {record['public']} (copy it to each device's ~/.config/edgekit/trusted_keys/ "
               "or /etc/edgekit/trusted_keys/)")


@main.command("sign")
@click.argument("bundle", type=click.Path())
@click.option("--key", "-k", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Private key (edgekit keygen, or an unencrypted OpenSSH ed25519 key).")
def sign_cmd(bundle: str, key: str) -> None:
    """Sign a bundle: writes BUNDLE/signature.json over every file's sha256 and the manifest
    (and rewrites BUNDLE.tar beside it, when there is one, to include the signature)."""
    from edgekit import api

    record = api.sign_bundle(bundle, key)
    click.echo(f"signed {record['files']} files ({record['bytes'] / 1e6:.1f} MB) of {record['bundle']} with key "
               f"{record['key_id']}: {record['signature']}")
    if record["unsigned"]:
        click.echo(f"  unsigned (device-built, not covered by the signature; rebuilt on each device, see docs/signing.md): "
                   f"{len(record['unsigned'])} file(s)")
        for rel in record["unsigned"]:
            click.echo(f"    {rel}")
    if record["tar"]:
        click.echo(f"  rewrote {record['tar']} (it now carries signature.json)")


@main.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--key", "-k", "keys", multiple=True, type=click.Path(), metavar="PUBFILE",
              help="Public key file or directory of *.pub (repeatable; default: this machine's trusted keys).")
def verify_cmd(bundle: str, keys: tuple[str, ...]) -> None:
    """Check a bundle's signature and every signed file (streamed sha256). Exit 0 when it
    verifies, 1 when it is unsigned, modified or signed by another key, 2 on bad input."""
    from edgekit import api
    from edgekit.errors import SignatureError

    try:
        report = api.verify_bundle(bundle, keys=list(keys) or None)
    except SignatureError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(1)
    click.echo(f"verified: {report['files']} files ({report['bytes'] / 1e6:.1f} MB), signed by {report['key_id']} "
               f"({report['key_source']}) at {report['signed_at']}")
    if report["device_files"]:
        click.echo(f"  unsigned (device-built, not covered by the signature): {len(report['device_files'])} file(s)")
        for rel in report["device_files"]:
            click.echo(f"    {rel}")


@main.command("unpack")
@click.argument("archive", metavar="BUNDLE.tar", type=click.Path(dir_okay=False))
@click.argument("dest", required=False, type=click.Path(file_okay=False))
def unpack_cmd(archive: str, dest: str | None) -> None:
    """Extract a bundle archive safely into DEST (default: here): refuses absolute paths, '..',
    links and special files, checks every file's sha256 against the manifest (and the
    signature when trusted keys are configured) before the bundle appears."""
    from edgekit import api

    record = api.unpack_bundle(archive, dest)
    signature = record["signature"]
    checked = (f"{signature['files']} of them signed by {signature['key_id']}" if signature
               else "signature not checked: no trusted keys configured here")
    click.echo(f"unpacked {record['bundle']}: {record['files']} files ({record['bytes'] / 1e6:.1f} MB) match manifest.json; "
               f"{checked}")
    if signature and signature["device_files"]:
        click.echo(f"  unsigned (device-built, not covered by the signature): {len(signature['device_files'])} file(s)")
        for rel in signature["device_files"]:
            click.echo(f"    {rel}")


@main.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port; 0 picks a free one (printed).")
@click.option("--policy", type=_setting(RuntimeConfig, "policy"), help="Routing policy (default: the bundle's runtime.json).")
@click.option("--large", metavar="BUNDLE_OR_URL", help="The large branch: a bundle directory or an OpenAI-compatible endpoint.")
@click.option("--backend", type=_setting(RuntimeConfig, "backend"), help="Local backend (default: the bundle's, auto).")
@click.option("--api-key", envvar="EDGEKIT_API_KEY", show_envvar=True, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' on /v1/*.")
@click.option("--auth-metrics", is_flag=True, help="Require the key on /healthz and /metrics too.")
@click.option("--max-concurrency", type=click.IntRange(1, MAX_STREAMS), default=1, show_default=True, help="Generations at once.")
@click.option("--max-queue", type=click.IntRange(0, 100_000), default=16, show_default=True, help="Requests waiting for a slot; beyond: 429.")
@click.option("--max-tokens-limit", type=click.IntRange(1, MAX_TOKENS), default=None,
              help="Largest max_tokens a request may ask for (default: 512, or the bundle's max_new_tokens when larger, as a reasoning bundle's is; always below the context).")
@click.option("--max-prompt-tokens", type=click.IntRange(1, MAX_TOKENS), help="Longest prompt in tokens (default: the context length - 1).")
@click.option("--max-body-bytes", type=click.IntRange(1024, 1 << 30), default=1 << 20, show_default=True, help="Largest request body; beyond: 413.")
@click.option("--request-timeout", type=_Finite(0, 86_400, min_open=True), default=300.0, show_default=True, help="Seconds per request, queue wait included.")
@click.option("--grace-period", type=_Finite(0, 86_400), default=30.0, show_default=True,
              help="On SIGINT/SIGTERM: seconds admitted requests may still take.")
@click.option("--branch-timeout", type=_setting(RuntimeConfig, "timeout_s", cap=86_400), metavar="S",
              help="A branch slower than this per request counts as failed (default: the bundle's timeout_s).")
@click.option("--threads", type=click.IntRange(1, 1024), help="ONNX Runtime intra-op threads per branch (default: one per core).")
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Open client connections; one more is answered 503 and closed.")
@click.option("--header-timeout", type=_Finite(0, 3600, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a request's headers (and then its body).")
@click.option("--keep-alive-timeout", type=_Finite(0, 3600, min_open=True), default=5.0, show_default=True,
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--tls-cert", type=click.Path(), metavar="FILE", help="PEM certificate (chain): serve HTTPS (TLS 1.2+).")
@click.option("--tls-key", type=click.Path(), metavar="FILE", help="PEM private key of --tls-cert (unencrypted).")
@click.option("--tls-client-ca", type=click.Path(), metavar="FILE",
              help="PEM CA: require client certificates signed by it (mutual TLS).")
@click.option("--quiet", "-q", is_flag=True, help="No access log on stderr.")
def serve_cmd(bundle: str, host: str, port: int, policy, large, backend, api_key, auth_metrics: bool, max_concurrency: int,
              max_queue: int, max_tokens_limit: int, max_prompt_tokens, max_body_bytes: int, request_timeout: float,
              grace_period: float, branch_timeout, threads, max_connections: int, header_timeout: float,
              keep_alive_timeout: float, tls_cert, tls_key, tls_client_ca, quiet: bool) -> None:
    """Serve the bundle over HTTP: OpenAI-compatible /v1/completions and /v1/chat/completions
    (streaming), /v1/models, /healthz and Prometheus /metrics, through the bundle's router.
    Prints one line with the URL once the model is loaded. See docs/serve.md."""
    from edgekit import api
    from edgekit.serve.server import ServeOptions

    for warning in ServeOptions(host=host, api_key=api_key, tls_cert=tls_cert).exposure_warnings():
        click.echo(warning, err=True)

    def ready(server) -> None:
        large_branch = server.branches.get("large")
        branches = f"small: {server.branches['small']['backend']}" + (
            f", large: {large_branch.get('url') or large_branch['backend']}" if large_branch else "")
        click.echo(f"edgekit serve: listening on {server.url} (model {server.model_name}, policy {server.policy}, {branches}; "
                   f"{max_concurrency} concurrent, queue {max_queue})")

    summary = api.serve(
        bundle, host=host, port=port, policy=policy, large=large, backend=backend, api_key=api_key, auth_metrics=auth_metrics,
        max_concurrency=max_concurrency, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, request_timeout_s=request_timeout,
        grace_period_s=grace_period, branch_timeout_s=branch_timeout, threads=threads, access_log=not quiet, on_ready=ready,
        max_connections=max_connections, header_timeout_s=header_timeout, keep_alive_timeout_s=keep_alive_timeout,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
    )
    if summary["drained"]:
        click.echo(f"edgekit serve: stopped ({summary['in_flight_at_signal']} request(s) were in flight or queued; all finished)",
                   err=True)
    else:
        click.echo(f"edgekit serve: stopped with {summary['unfinished']} request(s) unfinished after the grace period", err=True)
        sys.exit(1)


@main.command("validate")
@click.argument("bundle", type=click.Path())
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: the TensorRT engine when it is built here and loads, else ONNX Runtime.")
@click.option("--prompts", type=click.Path(dir_okay=False), metavar="FILE",
              help='One prompt per line, or JSON Lines {"prompt": ...} (default: 16 x 128 held-out tokens).')
@click.option("--concurrency", type=click.IntRange(1, MAX_STREAMS), default=1, show_default=True, metavar="N", help="Streams generating at once.")
@click.option("--requests", type=click.IntRange(1, 1_000_000), metavar="N", help="Measured requests (default: 16, or one per prompt of --prompts).")
@click.option("--warmup", type=click.IntRange(0, 10_000), default=2, show_default=True, metavar="N", help="Unmeasured requests first.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_TOKENS), default=64, show_default=True, metavar="N",
              help="Tokens generated per request (end-of-sequence is ignored).")
@click.option("--threads", type=click.IntRange(1, 1024), metavar="N", help="ONNX Runtime intra-op threads (default: ONNX Runtime's).")
@click.option("--output", "-o", type=click.Path(file_okay=False), metavar="DIR",
              help="Report directory (default: ./validate-<bundle name>; never inside the bundle).")
@click.option("--budget-latency-ms", type=_Finite(0, 1e7, min_open=True), metavar="X",
              help="Per-token p99 budget in ms (replaces the manifest's latency_p99_ms).")
@click.option("--budget-ttft-ms", type=_Finite(0, 1e7, min_open=True), metavar="X", help="Time-to-first-token p99 budget (replaces ttft_p99_ms).")
@click.option("--budget-memory-gb", type=_Finite(0, 1e6, min_open=True), metavar="X", help="Peak memory budget in GiB (replaces memory_gb).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def validate_cmd(bundle: str, backend: str, prompts: str | None, concurrency: int, requests: int | None, warmup: int,
                 max_new_tokens: int, threads: int | None, output: str | None, budget_latency_ms: float | None,
                 budget_ttft_ms: float | None, budget_memory_gb: float | None, as_json: bool, quiet: bool) -> None:
    """Measure the bundle on this machine (TTFT, per-token latency p50/p90/p99, tokens/s, peak
    memory; power on a Jetson) against its budgets; write validate.json + validate.html.
    Exit 0 when every budget is met, 1 when one is breached, 2 on bad input."""
    import json

    from edgekit import api

    report = api.validate_bundle(
        bundle, backend=backend, prompts=prompts, concurrency=concurrency, requests=requests, warmup=warmup,
        max_new_tokens=max_new_tokens, threads=threads, output_dir=output, quiet=quiet or as_json,
        budgets={"latency_p99_ms": budget_latency_ms, "ttft_p99_ms": budget_ttft_ms, "memory_gb": budget_memory_gb},
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_validation(report)
    if not report["passed"]:
        sys.exit(1)


def _print_validation(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bundle, settings, latency, budgets = report["bundle"], report["settings"], report["latency"], report["budgets"]
    table = Table(title=f"{bundle['name']} (target {bundle['target']}), {settings['backend']}, {settings['requests']} "
                        f"requests × {settings['max_new_tokens']} tokens, concurrency {settings['concurrency']}")
    for column in ("measure", "p50", "p90", "p99", "budget", "verdict"):
        table.add_column(column)

    def verdict_of(check: dict | None) -> str:
        return "" if check is None else ("[green]meets[/green]" if check["meets"] else "[bold red]BREACHED[/bold red]")

    for label, stats, key in (("TTFT ms", latency["ttft_ms"], "ttft_p99_ms"),
                              ("per-token latency (TPOT) ms", latency["tpot_ms"], "latency_p99_ms"),
                              ("decode tokens/s per stream", latency["decode_tokens_per_s_per_stream"], None)):
        stats, check = stats or {}, budgets.get(key) if key else None
        cells = [f"{stats[k]:.4g}" if stats.get(k) is not None else "—" for k in ("p50", "p90", "p99")]
        table.add_row(label, *cells, f"{check['budget']:g}" if check else "—", verdict_of(check))
    memory, check = report["memory"], budgets.get("memory_gb")
    table.add_row("peak memory GiB", "", "", f"{memory['measured_gb']:.3g} (peak)", f"{check['budget']:g}" if check else "—",
                  verdict_of(check))
    console.print(table)
    console.print(f"aggregate {latency['aggregate_tokens_per_s']:.4g} tokens/s over {settings['concurrency']} stream(s); "
                  f"memory = {memory['measured_is']}")
    predicted = report["predicted"]
    for entry in predicted.get("targets", []) if predicted.get("available") else []:
        if entry.get("supported"):
            decode, ttft = entry["comparison"][0], entry["comparison"][1]
            console.print(f"predicted for {entry['target']}: {decode['predicted']:.3g} ms/token, TTFT {ttft['predicted']:.3g} ms "
                          f"(measured here: {decode['measured']:.3g} ms/token, TTFT {ttft['measured']:.3g} ms)")
    power = report["power"]
    if power.get("available") and power.get("input_power_w"):
        watts = power["input_power_w"]
        console.print(f"power ({power['input_rail']}): mean {watts['mean']:.3g} W, max {watts['max']:.3g} W")
    for note in (None if report["host"]["is_target"] else report["host"]["note"], settings.get("backend_note")):
        if note:
            console.print(f"[bold yellow]note:[/bold yellow] {note}", highlight=False)
    if not budgets:
        console.print("no budgets set (none in the manifest, none given)")
    elif report["passed"]:
        console.print("[green]all budgets met[/green]")
    else:
        console.print("[bold red]BUDGET BREACHED: " + ", ".join(report["breached"]) + "[/bold red]")
    click.echo(f"report: {report['report']['json']} {report['report']['html']}")  # unwrapped: scripts read the paths


@main.command("deploy")
@click.argument("bundle", metavar="BUNDLE", type=click.Path())
@click.option("--host", "hosts", multiple=True, metavar="[USER@]HOST[:PORT]", help="A device (repeatable).")
@click.option("--hosts", "hosts_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A fleet: one [USER@]HOST[:PORT] per line, optional identity=/python=/root= fields, # comments.")
@click.option("--port", type=click.IntRange(1, 65535), help="SSH port for hosts that do not name one (default: ssh's, 22).")
@click.option("--identity", "-i", metavar="FILE", help="SSH private key (default: ssh's own choice).")
@click.option("--known-hosts", metavar="FILE", help="known_hosts file to check host keys against (default: ~/.ssh/known_hosts).")
@click.option("--remote-root", default="~/edgekit", show_default=True, help="Where edgekit keeps bundles and its runtime on the device.")
@click.option("--python", "remote_python", default="python3", show_default=True, help="Python interpreter on the device (3.10+).")
@click.option("--build-engine", is_flag=True, help="Run build-engine on the device before the version goes live.")
@click.option("--validate", is_flag=True, help="Run edgekit validate on the device after the deploy and fetch its report.")
@click.option("--concurrency", type=click.IntRange(1, MAX_STREAMS), help="validate: concurrent streams.")
@click.option("--requests", type=click.IntRange(1, 1_000_000), help="validate: measured requests.")
@click.option("--max-new-tokens", type=click.IntRange(1, MAX_TOKENS), help="validate: tokens generated per request.")
@click.option("--runtime", metavar="FILE", help="A prebuilt edgekit sdist to install (default: built from this checkout).")
@click.option("--reinstall-runtime", is_flag=True, help="Install the runtime even if the device has this version.")
@click.option("--keep", type=click.IntRange(2, 1000), default=3, show_default=True, help="Versions kept on the device (current and previous always).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=4, show_default=True, help="Devices deployed to in parallel.")
@click.option("--reports", "reports_dir", default="deploy-reports", show_default=True, metavar="DIR",
              help="Where validate reports are fetched to (DIR/<host>/<bundle>/<version>/).")
@click.option("--connect-timeout", type=click.IntRange(1, 3600), default=10, show_default=True, metavar="S")
@click.option("--rsync-path", metavar="PROGRAM", help="The rsync program on the device, when it is not on its PATH.")
@click.option("--rollback", is_flag=True, help="Point current back at the previous version (BUNDLE may be just the bundle's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-host records as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--bwlimit", type=click.IntRange(1), envvar="EDGEKIT_DEPLOY_BWLIMIT", hidden=True,
              help="rsync --bwlimit in KiB/s (tests; a slow link).")
def deploy_cmd(bundle: str, hosts: tuple[str, ...], hosts_file: str | None, port: int | None, identity: str | None,
               known_hosts: str | None, remote_root: str, remote_python: str, build_engine: bool, validate: bool,
               concurrency: int | None, requests: int | None, max_new_tokens: int | None, runtime: str | None,
               reinstall_runtime: bool, keep: int, jobs: int, reports_dir: str, connect_timeout: int, rsync_path: str | None,
               rollback: bool, as_json: bool, quiet: bool, bwlimit: int | None) -> None:
    """Deploy a bundle to devices over SSH: resumable upload (rsync), sha256 of every file checked
    on the device, the edgekit runtime installed there (C fast path compiled there), optional
    build-engine and validate on the device, a versioned directory and an atomic `current` link.
    Host keys are always checked. Exit 1 when a host failed (or, with --validate, breached a
    budget); the other hosts go on. See docs/deploy.md."""
    import json

    from rich.console import Console

    from edgekit import api

    validate_args: list[str] = []
    for flag, value in (("--concurrency", concurrency), ("--requests", requests), ("--max-new-tokens", max_new_tokens)):
        if value is not None:
            if not validate:
                raise EdgekitError(f"{flag} is an option of --validate", where=flag, how="add --validate or drop it")
            validate_args += [flag, str(value)]
    records = api.deploy(
        bundle, hosts=hosts, hosts_file=hosts_file, port=port, identity=identity, known_hosts=known_hosts, remote_root=remote_root,
        python=remote_python, build_engine=build_engine, validate=validate, validate_args=validate_args, runtime=runtime,
        reinstall_runtime=reinstall_runtime, keep=keep, jobs=jobs, reports_dir=reports_dir, connect_timeout=connect_timeout,
        bwlimit=bwlimit, rsync_path=rsync_path, rollback=rollback, console=None if quiet else Console(stderr=True),
    )
    from edgekit.deploy.deploy import HostResult
    from edgekit.deploy.fleet import exit_code, result_table

    results = [HostResult(**record) for record in records]
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
        console.print(result_table(results))
    sys.exit(exit_code(results))


@main.command("stages")
def stages_cmd() -> None:
    """List the stage types a recipe can use, with their parameters."""
    from edgekit import api

    for stage in api.list_stages():
        click.echo(f"{stage.type}: {stage.summary}")
        for name, field in stage.config.model_fields.items():
            default = field.get_default(call_default_factory=True)
            click.echo(f"    {name} = {default!r}  {field.description or ''}".rstrip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
