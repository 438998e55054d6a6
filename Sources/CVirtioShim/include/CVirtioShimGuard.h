// Surviving a guest-memory file that shrinks under its mapping. A vhost-user frontend shares guest
// RAM as a file descriptor it keeps; if it truncates the file later, the next access to a page past
// the new end raises SIGBUS, which would kill every device of the process. Mappings registered here
// are guarded: a SIGBUS inside one replaces the faulting page with a private zero page, so the access
// completes, and counts the fault, so the device stops using that memory. A SIGBUS anywhere else is
// what it always was. Signal handlers need sigaction's siginfo, which Swift cannot declare.
#ifndef CVIRTIO_SHIM_GUARD_H
#define CVIRTIO_SHIM_GUARD_H

#include <stddef.h>
#include <stdint.h>

// How many mappings can be guarded at once in the process.
#define CVS_GUARD_SLOTS 65536

// Installs the SIGBUS handler (once; later calls do nothing). 0, or -1 with errno set.
int cvs_guard_install(void);
// Guards [start, start + length), whose pages are `page_size` bytes (a hugetlbfs file's huge pages);
// returns a slot (>= 0), or -1 with errno ENOSPC when every slot is taken.
int cvs_guard_register(void *start, size_t length, size_t page_size);
// Stops guarding; call before unmapping.
void cvs_guard_unregister(int slot);
// Faults caught in one slot's mapping, and in all of them since the process started.
uint64_t cvs_guard_faults(int slot);
uint64_t cvs_guard_total_faults(void);

#endif
