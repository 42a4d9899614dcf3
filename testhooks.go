//go:build encdisk_testhooks

package main

// A build with the encdisk_testhooks tag reads the ENCDISK_TEST_* variables
// (see testHooks). Only the tests build it so.
func init() { testHooks = true }
