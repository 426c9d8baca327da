#!/usr/bin/env bash
# Optional reference tools from Debian: qemu-system-x86 (guests are cross-checked
# against QEMU TCG), gdb, and a Linux guest: Debian's cloud kernel
# (linux-image-cloud-amd64, /boot/vmlinuz-*-cloud-amd64) with busybox-static, from
# which the Linux boot tests build their initramfs.  Tests that need them skip
# when they are missing.
# Needs root and the Debian package registry; does nothing if all are present.
set -u
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v gdb >/dev/null 2>&1 || need+=(gdb)
command -v tshark >/dev/null 2>&1 || need+=(tshark)       # reads virtio-net's pcap captures
compgen -G '/boot/vmlinuz-*-cloud-amd64' >/dev/null || need+=(linux-image-cloud-amd64)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: not root or no apt-get; skipping ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
timeout 600 apt-get update -qq >/dev/null && timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
