#define _GNU_SOURCE
#include "CVirtioShim.h"
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <pthread.h>

const unsigned int CVS_MFD_CLOEXEC = MFD_CLOEXEC;
const unsigned int CVS_MFD_ALLOW_SEALING = MFD_ALLOW_SEALING;
const int CVS_EFD_CLOEXEC = EFD_CLOEXEC;
const int CVS_EFD_NONBLOCK = EFD_NONBLOCK;
const int CVS_EFD_SEMAPHORE = EFD_SEMAPHORE;

int cvs_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int cvs_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
int cvs_set_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }
