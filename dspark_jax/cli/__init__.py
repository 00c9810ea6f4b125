"""absl-flags command line: `dspark <command> [--flags]`."""
