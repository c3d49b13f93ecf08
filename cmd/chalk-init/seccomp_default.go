//go:build !chalktest_unfiltered

package main

// skipSeccomp is true only in a test build (tag chalktest_unfiltered) that
// ignores --seccomp-fd, to check that chalkd refuses an unfiltered init.
const skipSeccomp = false
