/* Runtime of vmlab's C test guests: Multiboot v1 entry, 16550 output at
 * 0x3f8, PASS/FAIL lines, isa-debug-exit at 0xf4 (guests/README.md).
 * 32-bit protected mode, flat segments, no paging: addresses are physical. */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__attribute__((section(".multiboot"), used, aligned(4)))
static const u32 multiboot_header[3] = {0x1BADB002u, 0x00000003u, -(0x1BADB002u + 0x00000003u)};

__asm__(".globl _start\n_start:\n"
        "  mov $stack_top, %esp\n"
        "  push %ebx\n  push %eax\n"
        "  call guest_main\n"
        "1: cli\n  hlt\n  jmp 1b\n"
        ".bss\n.align 16\nstack_bottom: .skip 65536\nstack_top:\n.text\n");

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
#define barrier() __asm__ volatile("" ::: "memory")

__attribute__((noinline)) static void putc(char c) {
    while (!(inb(0x3f8 + 5) & 0x20)) {}
    outb(0x3f8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u32 v) {
    puts("0x");
    for (int i = 28; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 15]);
}
static void putdec(u32 v) {
    char b[12]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc(b[--n]);
}
static void serial_init(void) {
    outb(0x3f8 + 1, 0); outb(0x3f8 + 3, 0x80); outb(0x3f8 + 0, 1); outb(0x3f8 + 1, 0);
    outb(0x3f8 + 3, 3); outb(0x3f8 + 2, 0xc7); outb(0x3f8 + 4, 3);
}

static int guest_fails;
static void check(int ok, const char *what) {
    puts(ok ? "PASS: " : "FAIL: ");
    puts(what);
    putc('\n');
    if (!ok) guest_fails++;
}
static void check_eq(u32 got, u32 want, const char *what) {
    if (got == want) { check(1, what); return; }
    puts("FAIL: "); puts(what); puts(" got="); puthex(got); puts(" want="); puthex(want); putc('\n');
    guest_fails++;
}
static __attribute__((noreturn)) void done(void) {
    puts("DONE\n");
    outb(0xf4, guest_fails ? 1 : 0);
    for (;;) __asm__ volatile("cli; hlt");
}

static void *memset(void *d, int c, u32 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
static void *memcpy(void *d, const void *s, u32 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
static int memeq(const void *a, const void *b, u32 n) {
    const u8 *p = a, *q = b;
    while (n--) if (*p++ != *q++) return 0;
    return 1;
}

/* The Multiboot command line (info flags bit 2), or "". */
static const char *cmdline(u32 mbinfo) {
    const u32 *info = (const u32 *)mbinfo;
    return (info[0] & 4) ? (const char *)info[4] : "";
}
/* Value of "key=" in the command line as a number (decimal), or dflt. */
static u32 cmd_num(const char *cl, const char *key, u32 dflt) {
    for (const char *p = cl; *p; p++) {
        if (p != cl && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=') continue;
        u32 v = 0;
        for (q++; *q >= '0' && *q <= '9'; q++) v = v * 10 + (u32)(*q - '0');
        return v;
    }
    return dflt;
}
static int cmd_has(const char *cl, const char *word) {
    for (const char *p = cl; *p; p++) {
        if (p != cl && p[-1] != ' ') continue;
        const char *k = word, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && (*q == ' ' || *q == 0 || *q == '=')) return 1;
    }
    return 0;
}
#endif
