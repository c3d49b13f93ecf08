// Command chalk is the chalkcompute CLI.
package main

import (
	"os"

	"github.com/chalkcompute/chalkcompute/cli"
)

func main() { os.Exit(cli.Run(os.Args[1:])) }
