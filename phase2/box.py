"""The box a submission's code runs in: ``python -I phase2/box.py`` before and inside Linux namespaces.

Started by :func:`phase2.isolated.run_isolated`; nothing of this project is imported (it runs
under ``python -I``). Two steps, each ending in ``exec`` of the next command:

* ``box.py --parent PID -- CMD...``: asks the kernel for SIGKILL when the checker (PID) dies,
  even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``), then runs CMD. CMD is
  ``unshare ... box.py --inside ...`` where the box is available, else the check itself.
* ``box.py --inside --tmp-size N -- CMD...``, run by ``unshare --user --map-root-user --mount
  --pid --fork --net --mount-proc --kill-child=SIGKILL`` (util-linux; no privilege needed where
  the kernel allows user namespaces): makes every mount of the new mount namespace read-only,
  mounts a fresh tmpfs of N bytes on ``/dev/shm`` (the only place it can write; it vanishes with
  the namespace; not ``/tmp``, where the zip or this project may lie), sets ``HOME`` and
  ``TMPDIR`` there and runs CMD as PID 1 of a new PID namespace:
  its ``/proc`` shows its own processes only, it has no network but a loopback that is down, and
  when it ends or is killed the kernel kills every process of the namespace, ``setsid`` or not.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
# statvfs flags a remount must keep (the kernel refuses to clear those locked by the outer namespace)
KEPT = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME
ST_RELATIME = 4096
EXIT_SETUP = 125  # the box could not be set up: nothing of CMD ran
PRIVATE = "/dev/shm"


def libc():
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent):
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the call: no signal would come
        os._exit(EXIT_SETUP)


def mount_points():
    """Every mount point of this mount namespace (``/proc/self/mountinfo``'s fifth field), once."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].encode().decode("unicode_escape")  # "\040" is a space
            if point not in points:
                points.append(point)
    return points


def remount_read_only(point):
    """None, or why ``point`` could not be made read-only (a mount hidden under another is no hole)."""
    try:
        st = os.statvfs(point)
    except OSError:
        return None  # not reachable from here (hidden under a later mount, or no permission)
    if st.f_flag & MS_RDONLY:
        return None
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | (st.f_flag & KEPT) | (MS_RELATIME if st.f_flag & ST_RELATIME else 0)
    if libc().mount(None, point.encode(), None, flags, None) == 0:
        return None
    err = ctypes.get_errno()
    if not os.path.ismount(point):
        return None  # the path now leads into another mount (a submount of the /proc that was replaced)
    return f"{point}: {os.strerror(err)}"


def enter_box(tmp_size):
    """Read-only mounts, a private tmpfs on PRIVATE; exits EXIT_SETUP with one line if any step fails."""
    for point in mount_points():
        problem = remount_read_only(point)
        if problem:
            sys.stderr.write(f"box: cannot make a mount read-only: {problem}\n")
            os._exit(EXIT_SETUP)
    options = f"size={int(tmp_size)},mode=1777".encode()
    if libc().mount(b"tmpfs", PRIVATE.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        sys.stderr.write(f"box: cannot mount a tmpfs on {PRIVATE}: {os.strerror(ctypes.get_errno())}\n")
        os._exit(EXIT_SETUP)
    os.environ.update(HOME=PRIVATE, TMPDIR=PRIVATE)
    os.chdir(PRIVATE)


def main(args):
    split = args.index("--")
    options, command = args[:split], args[split + 1 :]
    if options[0] == "--parent":
        die_with_parent(int(options[1]))
    elif options[0] == "--inside":
        enter_box(int(options[options.index("--tmp-size") + 1]))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
