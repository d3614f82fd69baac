"""`sdbridge run`: frames from a source through the engine to one or more sinks."""

from __future__ import annotations

import argparse
import logging

from ..control import add_arguments as add_control_arguments
from ..control.table import INPUT_FITS
from ..errors import UserError

log = logging.getLogger(__name__)

HELP_EPILOG = """\
sources: testpattern, video:FILE[?loop=1], camera:INDEX|DEVICE, ndi:NAME, spout:NAME (Windows)
sinks:   virtualcam[?backend=..&device=..], spout:NAME (Windows), ndi:NAME, file:OUT.mp4,
         file:DIR/%05d.png, window[:TITLE][?scale=0.5] (a preview), null
example: sdbridge run --source ndi:"TD Out" --sink virtualcam --sink spout:sdbridge \\
                      --model stabilityai/sd-turbo --prompt "a watercolor city at night"
"""


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by run and demo; every default is None so a config file can fill it."""
    add = parser.add_argument
    add("--model", help="hub id, folder, single .safetensors file, or random:tiny|sd15|sd-turbo")
    add("--vae", help="VAE: taesd-default, model, or a folder/hub id")
    add("--lcm-lora", dest="lcm_lora", help="LCM-LoRA weights to fuse into the UNet")
    add("--lora", action="append", metavar="FILE[:SCALE]",
        help="a style LoRA fused into the model at SCALE (default 1), after any LCM-LoRA; repeat for several")
    add("--live-lora", dest="live_lora", action="append", metavar="FILE[:SCALE]",
        help="a style LoRA whose strength (starting at SCALE, default 1) OSC /sd/lora/N changes while it runs "
             "(N: 1 for the first given; up to 4); keeps a copy of the layers it touches; not with tensorrt or fp8")
    add("--single-file-config", dest="single_file_config",
        help="a single .safetensors checkpoint's configs: a diffusers folder (offline) or hub id")
    add("--allow-pickle", dest="allow_pickle", action="store_const", const=True,
        help="allow pickle weights (.ckpt/.bin/.pt); they can run code")
    add("--mode", choices=("img2img", "txt2img"),
        help="img2img (default): the source's frames turned by the prompt; txt2img: pictures from the prompt "
             "alone, at most --fps a second, no source read")
    add("--txt2img-noise", dest="txt2img_noise", choices=("new", "seed"),
        help="txt2img: new noise each frame (default: a new picture each frame), or the seed's (a still "
             "picture that changes as the prompt or the seed do: with --prompt-transition or /sd/seed_blend, "
             "it morphs)")
    add("--input-fit", dest="input_fit", choices=INPUT_FITS,
        help="a source of another aspect ratio than --width x --height: its middle cropped to fill the picture "
             "(default), shown whole on black bars (letterbox), or stretched; OSC /sd/input_fit changes it")
    add("--width", type=int, help="processing and output width (a multiple of 64 for the SD models)")
    add("--height", type=int, help="processing and output height (a multiple of 64 for the SD models)")
    add("--aspect", choices=("fixed", "source"),
        help="fixed (default): process at --width x --height; source: at a size of the source's shape with "
             "about as many pixels (multiples of 64), e.g. 704x384 for a 1280x720 camera at the default 512x512: "
             "chosen from its first frame at start, and again whenever its shape changes")
    add("--t-index-list", dest="t_index_list", help="denoising timestep indices, e.g. 32,45")
    add("--steps", type=int, help="number of denoising steps (indices spread by --strength)")
    add("--strength", type=float, help="img2img strength in (0, 1]")
    add("--cfg", choices=("none", "full", "self", "initialize"), help="guidance type")
    add("--guidance", type=float, help="guidance scale")
    add("--delta", type=float, help="RCFG residual-noise scale")
    add("--seed", type=int, help="noise seed")
    add("--prompt", help="the prompt")
    add("--negative-prompt", dest="negative_prompt", help="the negative prompt")
    add("--prompt-transition", dest="prompt_transition", type=float, metavar="SECONDS",
        help="seconds a prompt change takes to fade in from the prompt shown (default 0: at once)")
    add("--similarity-filter", dest="similarity_filter", action=argparse.BooleanOptionalAction, default=None,
        help="skip nearly unchanged frames")
    add("--similarity-threshold", dest="similarity_threshold", type=float, help="similarity above which to skip")
    add("--backend", help="engine backend: eager (default), compiled (torch.compile, compiles at start) or "
                          "tensorrt (engines from `sdbridge build-engines`, see --engines)")
    add("--compile-steps", dest="compile_steps",
        help="also ready these step counts at start, e.g. 1,2,4: the compiled backend compiles them, tensorrt "
             "loads their engines, and a step graph (eager's default on CUDA) captures theirs, so "
             "/sd/t_index_list changing length readies nothing mid-show")
    add("--sizes", help="other sizes /sd/resolution may switch to during the show, readied at start, e.g. "
                        "768x448,1024x576 (compiled: compiled and captured now; tensorrt: their engines loaded "
                        "now, so a size never built is refused at start)")
    add("--cuda-graphs", dest="cuda_graphs", choices=("step", "modules", "off"),
        help="on CUDA: the whole step in one CUDA graph (eager's and compiled's default; with eager: no "
             "compile wait, one launch per frame; with tensorrt: untried on a real TensorRT yet), one graph "
             "per compiled module, or none (tensorrt's default; with eager: every kernel launched from "
             "Python, 2.5x slower on an H200)")
    add("--fp8", action="store_const", const=True,
        help="eager/compiled on an Ada or Hopper GPU: the UNet's transformer layers multiply in fp8 (faster, "
             "slightly different pictures; `sdbridge bench --fp8` measures both)")
    add("--fuse-qkv", dest="fuse_qkv", action=argparse.BooleanOptionalAction, default=None,
        help="eager/compiled: each self-attention layer's query, key and value from one projection (one "
             "larger matrix product instead of three; the same pictures; default: compiled on CUDA without "
             "--fp8 yes, elsewhere no)")
    add("--fuse-math", dest="fuse_math", action=argparse.BooleanOptionalAction, default=None,
        help="compiled: the step's arithmetic between the modules (noising, guidance, the bad-output check, "
             "the 8-bit conversions) compiled too, a few fused kernels a frame (default: on CUDA yes, except "
             "with --cuda-graphs modules; on a CPU no; together with --fuse-qkv 169.7 -> 175.7 fps for sd-turbo on an H200)")
    add("--overlap-decode", dest="overlap_decode", action="store_const", const=True,
        help="decode each frame's result during the next frame's step (on CUDA a parallel branch of the step "
             "graph, for the GPU to fill idle time with): one frame more latency; the same pictures")
    add("--overlap-encode", dest="overlap_encode", action="store_const", const=True,
        help="encode each frame during the previous frame's UNet, which the next step denoises (on CUDA the "
             "same way): one frame more latency")
    add("--backend-fallback", dest="backend_fallback",
        help="when --backend cannot start here (TensorRT or its engines missing, torch.compile failing), run on "
             "this backend instead, with a loud warning (default: stop with the reason)")
    add("--engines", help="tensorrt backend: the engine folder `sdbridge build-engines --cache` wrote (default ./engines)")
    add("--device", help="auto, cpu, cuda, cuda:1 ...")
    add("--dtype", help="auto, float32, float16, bfloat16")
    add("--fps", type=float, help="output frames per second (default 30)")
    add("--fallback", choices=("last", "black", "raw"), help="what sinks get while the source stalls")
    add("--duration", type=float, help="stop after this many seconds")
    add("--frames", type=int, help="stop after this many processed frames")
    add("--no-status", dest="status", action="store_const", const=False, help="no status line")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run the effect: source -> engine -> sinks", epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the live effect. Settings come from --config (TOML) and flags; flags win.",
    )
    parser.add_argument("--config", help="TOML file with the same settings (flags override it)")
    parser.add_argument("--source", help="where frames come from: testpattern (the default), camera:N or camera:NAME, video:FILE, "
                                         "ndi:NAME, spout:NAME, syphon:NAME; options after ?, e.g. video:clip.mp4?loop=1")
    parser.add_argument("--sink", action="append",
                        help="where frames go: virtualcam, spout:NAME, syphon:NAME, ndi:NAME, file:out.mp4, window, "
                             "null; options after ?, e.g. virtualcam?size=1280x720&fit=crop&filter=nearest "
                             "(README: sinks); repeat for several")
    parser.add_argument("--stop-on-stdin-eof", dest="stop_on_stdin_eof", action="store_true",
                        help="stop (exactly as on SIGTERM, also while the model loads) when standard input "
                             "ends: for a program that starts the bridge with a pipe as its input and closes "
                             "the pipe to stop it (the OBS script, the TouchDesigner component), which works "
                             "where signals do not, e.g. from a Windows program without a console; standard "
                             "input must be a pipe")
    add_engine_flags(parser)
    add_control_arguments(parser)
    parser.set_defaults(handler=handle)


def settings_from_args(args: argparse.Namespace, **defaults):
    from ..settings import FIELDS, merge, read_config_file

    try:
        file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
        flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
        if flags.get("oscquery_port") == "off":
            flags["oscquery"], flags["oscquery_port"] = False, None
        elif flags.get("oscquery_port") is not None:  # a port: OSCQuery on, whatever the file says
            flags["oscquery"] = True
        if flags.get("osc_allow") is not None:
            flags["osc_allow"] = tuple(a for item in flags["osc_allow"] for a in item.split(",") if a)
        for name in ("sink", "lora", "live_lora"):  # repeatable flags: lists from argparse, tuples in the settings
            if flags.get(name) is not None:
                flags[name] = tuple(flags[name])
        return merge(file_values, flags, **defaults)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def check_presets_against_engine(settings) -> None:
    """The config file's presets against the run's engine settings, before anything opens."""
    from ..engine import stream_config
    from ..settings import check_presets_fit

    if not settings.presets:
        return
    try:
        check_presets_fit(settings.presets, stream_config(settings))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def handle(args: argparse.Namespace) -> int:
    from ..cli import skip_teardown
    from ..session import format_summary, run_session

    settings = settings_from_args(args)
    check_presets_against_engine(settings)
    summary = run_session(settings, stop_on_stdin_eof=args.stop_on_stdin_eof)
    if summary.get("state") != "interrupted":
        print(format_summary(summary))
    if summary.get("stragglers"):
        log.warning("%s still busy after the stop; exiting without waiting for it", ", ".join(summary["stragglers"]))
    skip_teardown()  # everything is released: end without library destructors (see bridge.cli.entry)
    return 0
