//go:build chalktest_unfiltered

package main

// A test build: --seccomp-fd is ignored (chalkd must refuse the sandbox).
const skipSeccomp = true
