#!/usr/bin/env bash
# Builds the anvil RPM and Debian package into OUT_DIR and checks their file lists.
#
# Usage: scripts/package.sh OUT_DIR
#   - release build of the daemon (cargo) and the static guest agent (scripts/build-agent.sh)
#   - RPM: rpmbuild -bb dist/anvil.spec with the prebuilt files as %{_sourcedir}
#   - .deb: a staging tree + DEBIAN/{control,conffiles,postinst,prerm,postrm}, dpkg-deb
#   - fails unless `rpm -qlp` and `dpkg-deb -c` list the binary, the agent, the unit,
#     tmpfiles.d, the config and every policy, and both mark config + policies as config files
# Installs Debian's rpm (rpmbuild) if missing. Honours CARGO_TARGET_DIR. Prints the package
# paths on stdout, progress and timings on stderr.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf '[package] %s\n' "$*" >&2; }
die() { printf '[package] FAIL: %s\n' "$*" >&2; exit 1; }
t0=$SECONDS

[[ $# -eq 1 ]] || die "usage: scripts/package.sh OUT_DIR"
mkdir -p "$1"
out="$(cd "$1" && pwd)"

need=()
command -v rpmbuild >/dev/null || need+=(rpm)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
if ((${#need[@]})); then
    log "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && apt-get install -y -q "${need[@]}" >/dev/null; }
fi

version="$(awk '/^\[workspace\.package\]/{s=1; next} /^\[/{s=0} s && $1=="version"{gsub(/"/,"",$3); print $3; exit}' Cargo.toml)"
[[ -n "$version" ]] || die "no version in [workspace.package] of Cargo.toml"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

log "building anvil $version (release) and the static guest agent"
nice -n 10 cargo build --release -p anvil >&2
daemon="$target_dir/release/anvil"
agent="$(nice -n 10 scripts/build-agent.sh)"
[[ -x "$daemon" ]] || die "$daemon was not built"
[[ -x "$agent" ]] || die "$agent was not built"
log "built in $((SECONDS - t0))s"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
policies=(examples/policies/*.toml)
((${#policies[@]})) || die "no policies in examples/policies"

# Every installed file, flat, as the RPM's %{_sourcedir}.
src="$work/src"
mkdir -p "$src/policies" "$src/doc"
install -m 0755 "$daemon" "$src/anvil"
install -m 0755 "$agent" "$src/anvil-agent"
strip --strip-debug "$src/anvil"
install -m 0644 dist/anvil.service dist/tmpfiles-anvil.conf "$src/"
install -m 0644 examples/config.toml "$src/config.toml"
install -m 0644 "${policies[@]}" "$src/policies/"
for d in README.md docs/operations.md docs/api.md docs/architecture.md docs/openapi.json; do
    [[ -f "$d" ]] && install -m 0644 "$d" "$src/doc/"
done

# --- RPM
t1=$SECONDS
log "rpmbuild"
rpmbuild -bb dist/anvil.spec \
    --define "_topdir $work/rpmbuild" \
    --define "_sourcedir $src" \
    --define "_rpmdir $out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "anvil_version $version" >"$work/rpmbuild.log" 2>&1 ||
    { cat "$work/rpmbuild.log" >&2; die "rpmbuild failed"; }
rpm_file="$out/anvil-$version-1.x86_64.rpm"
[[ -f "$rpm_file" ]] || { cat "$work/rpmbuild.log" >&2; die "rpmbuild did not produce $rpm_file"; }
log "rpm built in $((SECONDS - t1))s"

# --- Debian package
t1=$SECONDS
log "dpkg-deb"
arch="$(dpkg --print-architecture)"
root="$work/deb/anvil_${version}_$arch"
install -D -m 0755 "$src/anvil" "$root/usr/bin/anvil"
install -D -m 0755 "$src/anvil-agent" "$root/usr/libexec/anvil/anvil-agent"
install -D -m 0644 "$src/anvil.service" "$root/usr/lib/systemd/system/anvil.service"
install -D -m 0644 "$src/tmpfiles-anvil.conf" "$root/usr/lib/tmpfiles.d/anvil.conf"
install -D -m 0644 "$src/config.toml" "$root/etc/anvil/config.toml"
install -d -m 0755 "$root/etc/anvil/policies" "$root/usr/share/doc/anvil"
install -m 0644 "$src"/policies/*.toml "$root/etc/anvil/policies/"
install -m 0644 "$src"/doc/* "$root/usr/share/doc/anvil/"
install -d -m 0711 "$root/var/lib/anvil"
install -d -m 0755 "$root/DEBIAN"
# Shared-library dependencies of the daemon (the agent is static), as dpkg-shlibdeps sees them.
mkdir -p "$work/shlibs/debian"
printf 'Source: anvil\n\nPackage: anvil\nArchitecture: any\n' >"$work/shlibs/debian/control"
shlibs="$(cd "$work/shlibs" && dpkg-shlibdeps -O "$root/usr/bin/anvil" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[[ -n "$shlibs" ]] || die "dpkg-shlibdeps found no dependencies of $root/usr/bin/anvil"
size_kb="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$size_kb/" \
    -e "s/@DEPENDS@/bubblewrap, $shlibs/" dist/deb/control.in >"$root/DEBIAN/control"
{
    echo /etc/anvil/config.toml
    for p in "$src"/policies/*.toml; do echo "/etc/anvil/policies/$(basename "$p")"; done
} >"$root/DEBIAN/conffiles"
install -m 0755 dist/deb/postinst dist/deb/prerm dist/deb/postrm "$root/DEBIAN/"
deb_file="$out/anvil_${version}_$arch.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb_file" >/dev/null
log "deb built in $((SECONDS - t1))s"

# --- Check both file lists.
expected=(
    /usr/bin/anvil
    /usr/libexec/anvil/anvil-agent
    /usr/lib/systemd/system/anvil.service
    /usr/lib/tmpfiles.d/anvil.conf
    /etc/anvil/config.toml
    /var/lib/anvil
    /usr/share/doc/anvil/operations.md
)
for p in "${policies[@]}"; do expected+=("/etc/anvil/policies/$(basename "$p")"); done
conf_expected=(/etc/anvil/config.toml)
for p in "${policies[@]}"; do conf_expected+=("/etc/anvil/policies/$(basename "$p")"); done

rpm -qlp "$rpm_file" 2>/dev/null >"$work/rpm.list"
rpm -qcp "$rpm_file" 2>/dev/null >"$work/rpm.conf"
# dpkg-deb -c prints `perms owner size date time ./path`; keep the path, drop `./` and a trailing /.
dpkg-deb -c "$deb_file" | awk '{print $NF}' | sed -e 's|^\.||' -e 's|/$||' >"$work/deb.list"
dpkg-deb -f "$deb_file" Depends >"$work/deb.depends"
dpkg-deb --ctrl-tarfile "$deb_file" | tar -xO ./conffiles >"$work/deb.conf"
missing=0
for f in "${expected[@]}"; do
    grep -qxF "$f" "$work/rpm.list" || { log "rpm lacks $f"; missing=1; }
    grep -qxF "$f" "$work/deb.list" || { log "deb lacks $f"; missing=1; }
done
for f in "${conf_expected[@]}"; do
    grep -qxF "$f" "$work/rpm.conf" || { log "rpm does not mark $f as %config"; missing=1; }
    grep -qxF "$f" "$work/deb.conf" || { log "deb does not list $f in conffiles"; missing=1; }
done
# No bogus dependencies: nothing on /dev/kvm or firecracker; bubblewrap required.
if rpm -qRp "$rpm_file" 2>/dev/null | grep -Eq '/dev/|firecracker'; then
    log "rpm has a bogus requirement: $(rpm -qRp "$rpm_file" | grep -E '/dev/|firecracker')"; missing=1
fi
rpm -qRp "$rpm_file" 2>/dev/null | grep -qx 'bubblewrap' || { log "rpm does not require bubblewrap"; missing=1; }
grep -q 'bubblewrap' "$work/deb.depends" || { log "deb does not depend on bubblewrap"; missing=1; }
if ((missing)); then
    echo "--- rpm -qlp" >&2; cat "$work/rpm.list" >&2
    echo "--- dpkg-deb -c" >&2; cat "$work/deb.list" >&2
    die "package contents are incomplete"
fi
log "ok: both packages hold ${#expected[@]} expected paths, config + ${#policies[@]} policies as config files"
log "total $((SECONDS - t0))s"
echo "$rpm_file"
echo "$deb_file"
