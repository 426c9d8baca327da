"""vmlab command line: ``vmlab run KERNEL``, ``vmlab bench NAME…``.

Every error a user can cause ends in one line on stderr and a documented exit
status (never a traceback).  Statuses vmlab itself chooses are even, so they never
collide with a guest's isa-debug-exit status, which is always odd
((value << 1) | 1, QEMU's convention):

====  ==============================================================
 0    the guest halted for good (HLT with nothing left to wake it)
 odd  the guest wrote to the isa-debug-exit port (port 0xf4)
 2    bad command line (unknown option, bad -m size, unknown -d item)
 4    the kernel file (or a module) is missing or unreadable
 6    the kernel is malformed, truncated or of an unsupported format
 8    the kernel does not fit the machine (segment outside RAM, …)
 10   the guest triple-faulted (the machine shut down)
 12   the instruction limit (--max-insns) was reached
 14   vmlab cannot continue (a feature it does not model, internal error)
 124  the --timeout expired (like timeout(1))
====  ==============================================================
"""
from __future__ import annotations

import argparse
import os
import sys

EXIT_HALTED, EXIT_USAGE, EXIT_FILE, EXIT_FORMAT, EXIT_CONFIG = 0, 2, 4, 6, 8
EXIT_TRIPLE_FAULT, EXIT_LIMIT, EXIT_ERROR, EXIT_TIMEOUT = 10, 12, 14, 124


class CliError(Exception):
    """A user error: message and exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def parse_size(text: str) -> int:
    """QEMU-style -m: a number is MiB; suffixes K, M, G (binary)."""
    t = text.strip().upper().removesuffix("B")
    mult = 1 << 20
    if t and t[-1] in "KMG":
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[t[-1]]
        t = t[:-1]
    try:
        val = float(t)
    except ValueError:
        raise CliError(f"bad memory size {text!r} (use e.g. 64M or 1G)", EXIT_USAGE) from None
    size = int(val * mult)
    if size <= 0:
        raise CliError(f"bad memory size {text!r}", EXIT_USAGE)
    return size


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _icount(text: str) -> int:
    """QEMU's -icount [shift=]N (softmmu/icount.c; N <= MAX_ICOUNT_SHIFT = 10).
    shift=auto, align and sleep are not modelled (vmlab's virtual time never
    follows the host)."""
    val = text[6:] if text.startswith("shift=") else text
    if "," in val or val == "auto":
        raise argparse.ArgumentTypeError(f"{text!r}: only shift=N (0..10) is supported")
    try:
        shift = int(val, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected shift=N with N in 0..10") from None
    if not 0 <= shift <= 10:
        raise argparse.ArgumentTypeError(f"{text!r}: shift must be 0..10")
    return shift


class _CpuAction(argparse.Action):
    """--cpu MODEL; --cpu help prints the models and features and exits 0
    (while parsing, so no kernel is needed, like QEMU's -cpu help)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from emu.cpuprobe import unicorn_models
        if values == "help":
            sys.stdout.write(cpu_help())
            parser.exit(0)
        if values not in unicorn_models():
            parser.error(f"unknown CPU model {values!r} (--cpu help lists them)")
        setattr(namespace, self.dest, values)


def cpu_help(default: str = "broadwell") -> str:
    """The text of ``vmlab run --cpu help``: every Unicorn CPU model with the
    features its probe clears, then the CPUID features advertised on the default
    model (leaf, register, bit, and the test or guest check that proves each)."""
    from emu.cpuid import CpuidModel
    from emu.cpuprobe import FEATURES, failing_features, unicorn_models
    lines = ["CPU models (--cpu MODEL; features whose instructions fail on the model are cleared):"]
    for name in unicorn_models():
        bad = sorted(failing_features(name))
        mark = " (default)" if name == default else ""
        lines.append(f"  {name:<20} cleared: {' '.join(bad) if bad else 'none'}{mark}")
    model = CpuidModel(unicorn_model=default)
    lines.append(f"Advertised CPUID features on {default} (SDM Vol. 2A CPUID):")
    for f in FEATURES:
        if model.advertises(f.name):
            lines.append(f"  {f.name:<10} CPUID.{f.leaf:X}H:{f.reg.upper()}[{f.bit}]  proved by {f.proof}")
    off = [f.name for f in FEATURES if not model.advertises(f.name)]
    lines.append(f"Not advertised: {' '.join(off)}")
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        sys.stderr.write(f"vmlab: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmlab", description="Run, step and test x86 guest code (see README.md).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="boot a kernel", description="Boot a kernel image and run it.")
    r.add_argument("kernel", help="kernel image, or a guest source (.asm) that is assembled first")
    r.add_argument("--format", default="auto", choices=["auto", "bootsector", "flat", "multiboot", "elf64", "bzimage", "pvh"])
    r.add_argument("-m", "--memory", default="64M", help="guest RAM (number = MiB; K/M/G suffix), default 64M")
    r.add_argument("--serial", default="stdio", help="stdio | file:PATH | none (default stdio)")
    r.add_argument("--append", default="", help="kernel command line (Multiboot, fw_cfg)")
    r.add_argument("--initrd", default="", help='Multiboot modules: "file arg,file2 arg2" (like QEMU)')
    r.add_argument("--flat-addr", type=_int, default=0x7C00, help="load address of a flat binary (0x7c00)")
    r.add_argument("--flat-mode", default="real", choices=["real", "protected32", "long64"])
    r.add_argument("--max-insns", type=_int, default=None, help="stop after about N guest instructions")
    r.add_argument("--timeout", type=float, default=None, help="stop after SECONDS of wall time")
    r.add_argument("--clock", choices=["virtual", "host"], default=None,
                   help="virtual: time is the instruction count, 1 instruction = 1 ns, deterministic "
                        "(default); host: time is the host's monotonic clock and no instruction is "
                        "counted (--max-insns N then means N ns of host time)")
    r.add_argument("--wall-clock", action="store_true", help="the same as --clock host")
    r.add_argument("-icount", "--icount", dest="icount", default=None, type=_icount, metavar="shift=N",
                   help="as QEMU: one instruction = 2^N ns of virtual time (N = 0..10; default 0)")
    r.add_argument("--cpu", "-cpu", dest="cpu", default="broadwell", action=_CpuAction, metavar="MODEL",
                   help="Unicorn CPU model the guest runs on (default broadwell); features whose "
                        "instructions fail on it are cleared from CPUID; 'help' lists models and features")
    r.add_argument("-d", dest="log_items", default="", help="log items, comma-separated (-d help lists them)")
    r.add_argument("-D", dest="log_file", default=None, help="write -d logs to this file (default stderr)")
    r.add_argument("-drive", dest="drives", action="append", default=[], metavar="file=PATH,if=virtio[,...]",
                   help="a virtio-blk disk: file=PATH,if=virtio[,format=raw][,readonly=on][,snapshot=on] "
                        "(repeatable; see README.md, virtio)")
    r.add_argument("-netdev", dest="netdevs", action="append", default=[], metavar="hub|dgram,id=ID,...",
                   help="a network back-end for -device virtio-net: hub,id=ID or dgram,id=ID,local.type=inet,"
                        "local.host=H,local.port=P,remote.type=inet,remote.host=H,remote.port=P (QEMU's)")
    r.add_argument("-object", dest="objects", action="append", default=[], metavar="filter-dump,...",
                   help="filter-dump,id=ID,netdev=ID,file=PATH[,maxlen=N]: capture a netdev's frames to pcap")

    # The debugger (tools/debugcli.py): QEMU's -s/-S/-gdb on run, and `vmlab debug`
    # with every run option (copied, so options added to run appear here too).
    from tools.debugcli import add_debug_options, add_gdb_options
    add_gdb_options(r)
    d = sub.add_parser("debug", help="boot a kernel stopped in the debugger REPL",
                       description="Boot a kernel stopped before its first instruction and debug it "
                                   "(gdb command names; see README.md, Debugging).")
    for action in r._actions:
        if action.dest != "help":
            d._add_action(action)
    add_debug_options(d)

    b = sub.add_parser("bench", help="benchmarks", description="Run benchmarks (see README.md).")
    b.add_argument("names", nargs="*", help="benchmarks to run (default: all); 'list' lists them")
    b.add_argument("--json", action="store_true", help="print one JSON object {name: {metric: value}}")
    return p


def _serial_sink(spec: str):
    if spec == "stdio":
        def sink(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return sink, None
    if spec == "none":
        return None, None
    if spec.startswith("file:") and len(spec) > 5:
        try:
            f = open(spec[5:], "wb")
        except OSError as exc:
            raise CliError(f"cannot open serial output {spec[5:]!r}: {exc.strerror}", EXIT_FILE) from None

        def fsink(data: bytes) -> None:
            f.write(data)
            f.flush()
        return fsink, f
    raise CliError(f"bad --serial {spec!r} (use stdio, file:PATH or none)", EXIT_USAGE)


def _modules(spec: str):
    from emu.loaders import read_image
    mods = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, _, arg = item.partition(" ")
        data = read_image(path, what="module")
        mods.append((data, (path + " " + arg).strip()))
    return mods


def cmd_run(args) -> int:
    from emu.errors import EmuError, LoaderError
    from emu.loaders import load, read_image
    from emu.loaders.errors import LoaderConfigError, LoaderFileError
    from vmm.log import ITEMS, DebugLog, LogError

    if args.log_items.strip() == "help":
        for name, text in ITEMS.items():
            print(f"{name:<8} {text}")
        return 0
    ram = parse_size(args.memory)
    log_stream = None
    if args.log_file:
        try:
            log_stream = open(args.log_file, "w")
        except OSError as exc:
            raise CliError(f"cannot open log file {args.log_file!r}: {exc.strerror}", EXIT_FILE) from None
    try:
        log = DebugLog.parse(args.log_items, log_stream)
    except LogError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    from tools import virtio_opts
    try:
        virtio_specs = virtio_opts.parse(args.drives, getattr(args, "other_devices", []), args.netdevs,
                                         args.objects)
    except virtio_opts.OptionError as exc:
        raise CliError(str(exc), exc.status) from None
    sink, sink_file = _serial_sink(args.serial)
    kernel = args.kernel
    try:
        if kernel.endswith(".asm"):
            from tools.asm import AsmError, build
            if not os.path.isfile(kernel):
                raise CliError(f"guest source {kernel!r} not found", EXIT_FILE)
            try:
                kernel = str(build(kernel))
                # A guest source may name its command line and modules in its
                # header (; vmlab-cmdline:, ; vmlab-module:); options override.
                from tools.guestbuild import boot_config
                config = boot_config(args.kernel)
            except AsmError as exc:
                raise CliError(f"cannot assemble {args.kernel}: {exc}", EXIT_FORMAT) from None
            if not args.append and config.cmdline:
                args.append = config.cmdline
            if not args.initrd and config.modules:
                args.initrd = ",".join(line for _, line in config.modules)
        if kernel.endswith(".c"):
            from tools.cguest import CGuestError, build as cbuild
            if not os.path.isfile(kernel):
                raise CliError(f"guest source {kernel!r} not found", EXIT_FILE)
            try:
                kernel = str(cbuild(kernel))
            except CGuestError as exc:
                raise CliError(str(exc).splitlines()[0], EXIT_FORMAT) from None
        if virtio_specs:
            # Linux finds virtio-mmio devices on its command line (Firecracker's way).
            args.append = " ".join(filter(None, (args.append, virtio_opts.cmdline(virtio_specs))))
        data = read_image(kernel)
        image = load(data, fmt=args.format, ram_size=ram, cmdline=args.append, modules=_modules(args.initrd),
                     flat_addr=args.flat_addr, flat_mode=args.flat_mode)
    except LoaderFileError as exc:
        raise CliError(str(exc), EXIT_FILE) from None
    except LoaderConfigError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    except LoaderError as exc:
        raise CliError(str(exc), EXIT_FORMAT) from None

    from vmm.vm import Vm
    try:
        clock = args.clock or ("host" if args.wall_clock else "virtual")
        if args.icount is not None and clock == "host":
            raise CliError("-icount needs the virtual clock (drop --clock host / --wall-clock)", EXIT_USAGE)
        from emu.cpuid import CpuidModel
        vm = Vm(ram, serial=sink, log=log, cmdline=args.append, clock=clock,
                cpuid=CpuidModel(unicorn_model=args.cpu), icount_shift=args.icount or 0)
        vm.load(image)
        try:
            virtio_opts.attach(vm, virtio_specs)
        except virtio_opts.OptionError as exc:
            raise CliError(str(exc), exc.status) from None
        _attach_stdin(vm, args.serial)
        if args.cmd == "debug" or args.gdb is not None:
            from tools.debugcli import debug_session
            result = debug_session(vm, args, args.kernel)
            if isinstance(result, int):
                return result
        else:
            result = vm.run(max_insns=args.max_insns, timeout=args.timeout)
    except EmuError as exc:
        raise CliError(str(exc), EXIT_CONFIG if "RAM size" in str(exc) else EXIT_ERROR) from None
    finally:
        if sink_file:
            sink_file.close()
    if result.reason == "debug-exit":
        return result.status & 0xFF
    if result.reason == "halted":
        return EXIT_HALTED
    msg = {"shutdown": EXIT_TRIPLE_FAULT, "limit": EXIT_LIMIT, "timeout": EXIT_TIMEOUT}
    status = msg.get(result.reason, EXIT_ERROR)
    sys.stderr.write(f"vmlab: {result.message}\n")
    return status


def _attach_stdin(vm, serial: str) -> None:
    """Feed host stdin to the UART when it is an interactive terminal."""
    if serial != "stdio" or not sys.stdin.isatty():
        return
    import threading

    def reader():
        while True:
            try:
                data = os.read(0, 256)
            except OSError:
                return
            if not data:
                return
            vm.post_input(data)
    threading.Thread(target=reader, daemon=True).start()


def cmd_bench(args) -> int:
    from tools import bench
    return bench.main(args.names, as_json=args.json)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("run", "debug"):
            return cmd_run(args)
        if args.cmd == "bench":
            return cmd_bench(args)
    except CliError as exc:
        sys.stderr.write(f"vmlab: error: {exc}\n")
        return exc.status
    except KeyboardInterrupt:
        sys.stderr.write("vmlab: interrupted\n")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
