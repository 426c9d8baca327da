"""vmlab command line: ``vmlab run KERNEL``, ``vmlab bench NAME…``.

Every error a user can cause ends in one line on stderr and a documented exit
status (never a traceback).  Statuses vmlab itself chooses are even, so they never
collide with a guest's isa-debug-exit status, which is always odd
((value << 1) | 1, QEMU's convention):

====  ==============================================================
 0    the user quit at the console (Ctrl-A x), the guest reset the
      machine under -no-reboot (as QEMU), or the guest powered it off
      (ACPI S5, e.g. Linux's poweroff)
 odd  the guest wrote to the isa-debug-exit port (port 0xf4)
 2    bad command line (unknown option, bad -m size, unknown -d item)
 4    the kernel file (or a module) is missing or unreadable
 6    the kernel is malformed, truncated or of an unsupported format
 8    the kernel does not fit the machine (segment outside RAM, …)
 10   the guest triple-faulted (the machine shut down)
 12   the instruction limit (--max-insns) was reached
 14   vmlab cannot continue (a feature it does not model, internal error)
 16   the guest halted with nothing left to wake it
 124  the --timeout expired (like timeout(1))
 130  interrupted (SIGINT, or Ctrl-C at a -serial stdio console)
====  ==============================================================
"""
from __future__ import annotations

import argparse
import os
import re
import sys

EXIT_HALTED, EXIT_USAGE, EXIT_FILE, EXIT_FORMAT, EXIT_CONFIG = 0, 2, 4, 6, 8
EXIT_TRIPLE_FAULT, EXIT_LIMIT, EXIT_ERROR, EXIT_TIMEOUT = 10, 12, 14, 124
EXIT_HALTED_FOREVER, EXIT_INTERRUPTED, EXIT_QUIT = 16, 130, 0
#: reboots (the guest's resets without -no-reboot) before vmlab gives up
MAX_REBOOTS = 1000


class CliError(Exception):
    """A user error: message and exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def parse_size(text: str) -> int:
    """QEMU-style -m (tools.qemu_opts.parse_size), within what the machine takes."""
    from vmlab.emu.memory import MAX_RAM
    from vmlab.tools.qemu_opts import OptionError, parse_size as qsize
    try:
        return qsize(text, MAX_RAM)
    except OptionError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


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


#: -cpu MODEL,+FLAG / -FLAG / FLAG=on|off: the CPU flags vmlab can switch (QEMU's spelling)
CPU_FLAGS = {"vmx": "nested_vmx"}


class _CpuAction(argparse.Action):
    """--cpu MODEL[,+vmx|,-vmx|,vmx=on|off]; --cpu help prints the models and
    features and exits 0 (while parsing, so no kernel is needed, like QEMU's
    -cpu help).  ``+vmx`` is guest-visible VMX (vmm/nested.py), as QEMU's
    ``-cpu ...,+vmx``; --nested-vmx is the same."""

    def __call__(self, parser, namespace, values, option_string=None):
        from vmlab.emu.cpuprobe import unicorn_models
        if values == "help":
            sys.stdout.write(cpu_help())
            parser.exit(0)
        model, *flags = values.split(",")
        if model not in unicorn_models():
            parser.error(f"unknown CPU model {model!r} (--cpu help lists them)")
        for flag in flags:
            name, on = flag, True
            if flag[:1] in "+-" and flag:
                name, on = flag[1:], flag[0] == "+"
            elif "=" in flag:
                name, val = flag.split("=", 1)
                if val not in ("on", "off"):
                    parser.error(f"CPU flag {flag!r}: the value must be on or off")
                on = val == "on"
            if name not in CPU_FLAGS:
                parser.error(f"unsupported CPU flag {flag!r} (vmlab switches only: "
                             f"{', '.join('+' + n for n in CPU_FLAGS)})")
            setattr(namespace, CPU_FLAGS[name], on)
        setattr(namespace, self.dest, model)


def cpu_help(default: str = "broadwell") -> str:
    """The text of ``vmlab run --cpu help``: every Unicorn CPU model with the
    features its probe clears, then the CPUID features advertised on the default
    model (leaf, register, bit, and the test or guest check that proves each)."""
    from vmlab.emu.cpuid import CpuidModel
    from vmlab.emu.cpuprobe import FEATURES, failing_features, unicorn_models
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


def _say(line: str) -> None:
    """One line on stderr, whatever it holds (a non-UTF-8 argument comes back
    as surrogates) and whether or not stderr is still open."""
    try:
        sys.stderr.buffer.write(line.encode("utf-8", "backslashreplace") + b"\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2
        _say(f"vmlab: error: {message.splitlines()[0] if message else 'bad command line'}")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vmlab", description="Run, step and test x86 guest code (see README.md).",
                allow_abbrev=False)
    p.add_argument("--version", action="store_true", help="print vmlab's version and exit")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    r = sub.add_parser("run", help="boot a kernel", description="Boot a kernel image and run it. "
                       "QEMU's spellings work too: vmlab -kernel K -serial stdio -m 64M ... (see README.md).",
                       allow_abbrev=False)
    r.add_argument("kernel", nargs="?", default=None,
                   help="kernel image, or a guest source (.asm) that is assembled first")
    r.add_argument("-kernel", dest="kernel_opt", default=None, metavar="KERNEL", help="the kernel, as QEMU")
    r.add_argument("--format", default="auto", choices=["auto", "bootsector", "flat", "multiboot", "elf64", "bzimage", "pvh"])
    r.add_argument("-m", "--memory", default="64M",
                   help="guest RAM: N (MiB) or N with a B/K/M/G/T suffix, [size=]N[,...] as QEMU; default 64M")
    r.add_argument("--serial", "-serial", dest="serial", action="append", default=[],
                   help="stdio | mon:stdio | file:PATH | none (default stdio)")
    r.add_argument("-nographic", action="store_true", help="as QEMU: the serial port on stdio (mon:stdio)")
    r.add_argument("-no-reboot", dest="no_reboot", action="store_true",
                   help="end the run (status 0) when the guest resets the machine, instead of rebooting")
    r.add_argument("-no-shutdown", dest="no_shutdown", action="store_true", help="accepted for QEMU (no effect)")
    for opt in ("-display", "-vga", "-monitor", "-parallel"):
        r.add_argument(opt, dest="ignored_" + opt[1:], choices=["none"], default=None,
                       help=f"accepted for QEMU: only {opt} none (vmlab has no display or monitor)")
    r.add_argument("-nodefaults", action="store_true", help="accepted for QEMU (no effect)")
    r.add_argument("-device", dest="devices", action="append", default=[], metavar="DEVICE,...",
                   help="isa-debug-exit,iobase=N,iosize=N (moves the debug-exit port), or a virtio device")
    r.add_argument("--append", "-append", dest="append", default="", help="kernel command line (Multiboot, fw_cfg)")
    r.add_argument("--initrd", "-initrd", dest="initrd", default="",
                   help='Multiboot modules: "file arg,file2 arg2" (like QEMU)')
    r.add_argument("--flat-addr", type=_int, default=None, help="load address of a flat binary (0x7c00); "
                   "implies --format flat")
    r.add_argument("--flat-mode", default=None, choices=["real", "protected32", "long64"],
                   help="entry mode of a flat binary (real); implies --format flat")
    r.add_argument("--max-insns", default=None, help="stop after about N guest instructions")
    r.add_argument("--timeout", default=None, help="stop after SECONDS of wall time (a host timer)")
    r.add_argument("--clock", choices=["virtual", "host"], default=None,
                   help="virtual: time is the instruction count, 1 instruction = 1 ns, deterministic "
                        "(default); host: time is the host's monotonic clock and no instruction is "
                        "counted (--max-insns N then means N ns of host time)")
    r.add_argument("--wall-clock", action="store_true", help="the same as --clock host")
    r.add_argument("-icount", "--icount", dest="icount", default=None, type=_icount, metavar="shift=N",
                   help="as QEMU: one instruction = 2^N ns of virtual time (N = 0..10; default 0)")
    r.add_argument("--cpu", "-cpu", dest="cpu", default="broadwell", action=_CpuAction, metavar="MODEL",
                   help="Unicorn CPU model the guest runs on (default broadwell); features whose "
                        "instructions fail on it are cleared from CPUID; 'help' lists models and features; "
                        "MODEL,+vmx gives the guest VMX (as QEMU; see README.md, Nested VMX)")
    r.add_argument("--nested-vmx", dest="nested_vmx", action="store_true", default=False,
                   help="guest-visible VMX: the guest's own hypervisor runs its guest (the same as -cpu MODEL,+vmx)")
    r.add_argument("-d", dest="log_items", action="append", default=[],
                   help="log items, comma-separated, repeatable (-d help lists them)")
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
    from vmlab.tools.debugcli import add_debug_options, add_gdb_options
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


def _serial_sink(spec: str, append: bool = False):
    if spec in ("stdio", "mon:stdio"):
        from vmlab.tools.qemu_opts import SafeStream
        stream = SafeStream(sys.stdout.buffer)

        def sink(data: bytes) -> None:
            stream.write(data)
        sink.stream = stream
        return sink, None
    if spec == "none":
        return None, None
    if spec.startswith("file:") and len(spec) > 5:
        try:
            f = open(spec[5:], "ab" if append else "wb")
        except OSError as exc:
            raise CliError(f"cannot open serial output {spec[5:]!r}: {exc.strerror}", EXIT_FILE) from None

        def fsink(data: bytes) -> None:
            f.write(data)
            f.flush()
        return fsink, f
    raise CliError(f"bad --serial {spec!r} (use stdio, file:PATH or none)", EXIT_USAGE)


def _modules(spec: str):
    from vmlab.emu.loaders import read_image
    mods = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, _, arg = item.partition(" ")
        data = read_image(path, what="module")
        mods.append((data, (path + " " + arg).strip()))
    return mods


def cmd_run(args) -> int:
    from vmlab.emu.errors import EmuError, LoaderError
    from vmlab.emu.loaders import load, read_image
    from vmlab.emu.loaders.errors import LoaderConfigError, LoaderFileError
    from vmlab.vmm.log import ITEMS, DebugLog, LogError

    from vmlab.tools import qemu_opts
    items = ",".join(args.log_items)
    if "help" in (i.strip() for i in items.split(",")):
        for name, text in ITEMS.items():
            print(f"{name:<12} {text}")
        return 0
    _check_run_args(args)
    ram = parse_size(args.memory)
    log_stream = None
    if args.log_file:
        try:
            log_stream = open(args.log_file, "w")
        except OSError as exc:
            raise CliError(f"cannot open log file {args.log_file!r}: {exc.strerror}", EXIT_FILE) from None
    try:
        log = DebugLog.parse(items, log_stream)
    except LogError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    from vmlab.tools import virtio_opts
    try:
        virtio_specs = virtio_opts.parse(args.drives, getattr(args, "other_devices", []), args.netdevs,
                                         args.objects)
    except virtio_opts.OptionError as exc:
        raise CliError(str(exc), exc.status) from None
    sink, sink_file = _serial_sink(args.serial, append=getattr(args, "boots", 0) > 0)
    kernel = args.kernel
    try:
        if kernel.endswith(".asm"):
            from vmlab.tools.asm import AsmError, build
            if not os.path.isfile(kernel):
                raise CliError(f"guest source {kernel!r} not found", EXIT_FILE)
            try:
                kernel = str(build(kernel))
                # A guest source may name its command line and modules in its
                # header (; vmlab-cmdline:, ; vmlab-module:); options override.
                from vmlab.tools.guestbuild import boot_config
                config = boot_config(args.kernel)
            except AsmError as exc:
                raise CliError(f"cannot assemble {args.kernel}: {exc}", EXIT_FORMAT) from None
            if not args.append and config.cmdline:
                args.append = config.cmdline
            if not args.initrd and config.modules:
                args.initrd = ",".join(line for _, line in config.modules)
        if kernel.endswith(".c"):
            from vmlab.tools.cguest import CGuestError, build as cbuild
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

    from vmlab.vmm.vm import Vm
    try:
        clock = args.clock or ("host" if args.wall_clock else "virtual")
        if args.icount is not None and clock == "host":
            raise CliError("-icount needs the virtual clock (drop --clock host / --wall-clock)", EXIT_USAGE)
        from vmlab.emu.cpuid import CpuidModel
        vm = Vm(ram, serial=sink, log=log, cmdline=args.append, clock=clock,
                cpuid=CpuidModel(unicorn_model=args.cpu), icount_shift=args.icount or 0)
        if args.nested_vmx:
            vm.enable_nested_vmx()
        vm.load(image)
        try:
            virtio_opts.attach(vm, virtio_specs)
        except virtio_opts.OptionError as exc:
            raise CliError(str(exc), exc.status) from None
        try:
            qemu_opts.attach_debug_exits(vm, args.debug_exit_ports)
        except qemu_opts.OptionError as exc:
            raise CliError(str(exc), exc.status) from None
        vm.warn = lambda text: _say(f"vmlab: warning: {text}")
        console = _attach_stdin(vm, args)
        if args.cmd == "debug" or args.gdb is not None:
            from vmlab.tools.debugcli import debug_session
            result = debug_session(vm, args, args.kernel)
            if isinstance(result, int):
                return result
        else:
            try:
                result = _run_vm(vm, args)
            finally:
                if console is not None:
                    console.close()
    except EmuError as exc:
        raise CliError(str(exc), EXIT_CONFIG if "RAM size" in str(exc) else EXIT_ERROR) from None
    finally:
        if sink_file:
            sink_file.close()
    if sink is not None and getattr(sink, "stream", None) is not None and sink.stream.broken:
        _say("vmlab: note: stdout was closed (broken pipe); the guest's later serial output was dropped")
    return _status(result, args)


def _status(result, args) -> int:
    """The process status of a run's RunResult (README, Exit status), with the
    one line that says why for vmlab's own statuses."""
    reason = result.reason
    if reason == "debug-exit":
        return result.status & 0xFF
    if reason == "reset":
        if args.no_reboot:
            _say(f"vmlab: {result.message}; -no-reboot: exit")
            return EXIT_QUIT
        return REBOOT
    if reason == "stopped" and result.message.startswith(("terminated", "interrupted")):
        _say(f"vmlab: {result.message}")
        return EXIT_QUIT if result.message.startswith("terminated") else EXIT_INTERRUPTED
    if reason == "poweroff":
        _say(f"vmlab: {result.message}")
        return EXIT_QUIT
    if reason == "halted":
        _say(f"vmlab: {result.message} (nothing can wake it: status {EXIT_HALTED_FOREVER})")
        return EXIT_HALTED_FOREVER
    msg = {"shutdown": EXIT_TRIPLE_FAULT, "limit": EXIT_LIMIT, "timeout": EXIT_TIMEOUT}
    status = msg.get(reason, EXIT_ERROR)
    _say(f"vmlab: {result.message}")
    return status


#: cmd_run's answer when the guest reset the machine without -no-reboot
REBOOT = object()


class _SigintStops:
    """While a run goes on, SIGINT stops it at the next block boundary (status
    130, as QEMU), however long the guest stays in native code: Python runs
    signal handlers only between bytecodes, so the signal's wake-up byte
    (signal.set_wakeup_fd, written by the C-level handler at once) wakes a
    thread that makes the engine stop (vmm.runloop.request_async)."""

    def __init__(self, vm):
        self.vm = vm
        self.active = False

    def __enter__(self):
        import os
        import signal
        import threading
        from vmlab.vmm import runloop
        if threading.current_thread() is not threading.main_thread():
            return self
        runloop.enable_async(self.vm)
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.wfd, False)
        self.done = False
        self.old_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)
        self.old_fd = signal.set_wakeup_fd(self.wfd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._watch, name="vmlab-sigint", daemon=True)
        self.thread.start()
        self.active = True
        return self

    def _watch(self) -> None:
        import os
        import signal
        from vmlab.vmm import runloop
        while True:
            try:
                data = os.read(self.rfd, 64)
            except OSError:
                return
            if self.done or not data:
                return
            if signal.SIGINT in data:
                runloop.request_async(self.vm, "interrupt")

    def __exit__(self, *exc):
        import os
        import signal
        if not self.active:
            return False
        signal.set_wakeup_fd(self.old_fd)
        signal.signal(signal.SIGINT, self.old_handler)
        self.done = True
        try:
            os.write(self.wfd, b"\0")
        except OSError:
            pass
        self.thread.join(timeout=1.0)
        os.close(self.rfd)
        os.close(self.wfd)
        return False


def _run_vm(vm, args):
    """vm.run with what is left of --max-insns and --timeout across reboots."""
    import time
    timeout = None
    if args.timeout is not None:
        timeout = max(0.0, args.deadline - time.monotonic())
    with _SigintStops(vm):
        res = vm.run(max_insns=args.insns_left, timeout=timeout)
    if args.insns_left is not None:
        args.insns_left = max(1, args.insns_left - res.icount)
    return res


def _check_run_args(args) -> None:
    """Turn the QEMU spellings into vmlab's and validate what argparse cannot
    (one line, status 2 on error)."""
    import time
    from vmlab.tools import qemu_opts
    if getattr(args, "checked", False):      # a reboot runs cmd_run again
        return
    args.checked = True
    try:
        if args.kernel_opt is not None:
            if args.kernel is not None and args.kernel != args.kernel_opt:
                raise qemu_opts.OptionError(f"two kernels given: {args.kernel!r} and -kernel {args.kernel_opt!r}")
            args.kernel = args.kernel_opt
        if args.kernel is None:
            raise qemu_opts.OptionError("no kernel given (vmlab run KERNEL, or -kernel KERNEL)")
        for text in (args.kernel, args.append, args.initrd):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise qemu_opts.OptionError(f"argument {text.encode('utf-8', 'backslashreplace').decode()!r} "
                                            f"is not valid UTF-8") from None
        args.serial = qemu_opts.parse_serial(args.serial, args.nographic)
        if not isinstance(args.timeout, (float, type(None))):
            args.timeout = qemu_opts.parse_positive("--timeout", args.timeout)
        if not isinstance(args.max_insns, (int, type(None))):
            args.max_insns = qemu_opts.parse_positive("--max-insns", args.max_insns, integer=True)
        args.debug_exit_ports, args.other_devices = qemu_opts.split_devices(args.devices)
        rest = args.other_devices
        from vmlab.tools import virtio_opts
        if rest and not hasattr(virtio_opts, "parse_device"):   # virtio -device specs are virtio_opts
            raise qemu_opts.OptionError(f"-device {rest[0]!r}: unknown device "
                                        f"(vmlab has isa-debug-exit and the virtio devices)")
    except qemu_opts.OptionError as exc:
        raise CliError(str(exc), exc.status) from None
    if not hasattr(args, "deadline"):
        args.deadline = time.monotonic() + args.timeout if args.timeout is not None else None
        args.insns_left = args.max_insns
    if args.format == "auto" and (args.flat_addr is not None or args.flat_mode is not None):
        args.format = "flat"


def _attach_stdin(vm, args):
    """The interactive console (tools.qemu_opts.Console) when stdin is a
    terminal and the serial port is on stdio; returns it (or None)."""
    if args.serial not in ("stdio", "mon:stdio") or args.cmd == "debug":
        return None
    try:
        if not os.isatty(0):
            return None
    except OSError:
        return None
    from vmlab.tools.qemu_opts import Console
    try:
        return Console(vm, 0, ctrl_c_to_guest=args.serial == "mon:stdio")
    except OSError:
        return None


def cmd_bench(args) -> int:
    from vmlab.tools import bench
    return bench.main(args.names, as_json=args.json)


def version() -> str:
    try:
        from importlib.metadata import version as v
        return v("vmlab")
    except Exception:           # not installed (run from a checkout)
        return "unknown"


def _unknown_option(parser, argv: list[str]) -> str | None:
    """The first token that looks like an option but is none of ``run``'s
    (QEMU-style single-dash words included), skipping option values.
    argparse alone would read ``-smp`` as ``-s -m p`` or ``-machine`` as
    ``-m achine``."""
    if not argv or argv[0] not in ("run", "debug"):
        return None
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
    opts = sub._option_string_actions
    i = 1
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return None
        name = tok.split("=", 1)[0] if tok.startswith("--") else tok
        if name in opts:
            action = opts[name]
            i += 1 if action.nargs == 0 or "=" in tok else 2
            continue
        if tok.startswith("-") and len(tok) > 1 and not re.fullmatch(r"-[\d.]+", tok):
            return tok
        i += 1
    return None


def main(argv=None) -> int:
    from vmlab.tools.qemu_opts import normalize_argv, silence_broken_stdio
    argv = normalize_argv(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    bad = _unknown_option(parser, argv)
    if bad is not None:
        _say(f"vmlab: error: unknown option {bad} (not supported by vmlab; see vmlab {argv[0]} --help)")
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
        if args.version:
            print(f"vmlab {version()}")
            return 0
        if args.cmd in ("run", "debug"):
            while True:
                status = cmd_run(args)
                if status is not REBOOT:
                    return status
                args.boots = getattr(args, "boots", 0) + 1
                if args.boots > MAX_REBOOTS:
                    _say(f"vmlab: the guest reset the machine {MAX_REBOOTS} times; giving up")
                    return EXIT_ERROR
        if args.cmd == "bench":
            return cmd_bench(args)
        parser.print_help()
    except CliError as exc:
        _say(f"vmlab: error: {exc}")
        return exc.status
    except KeyboardInterrupt:
        _say("vmlab: interrupted")
        return EXIT_INTERRUPTED
    finally:
        silence_broken_stdio()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
