//go:build tools

// Package tools pins the Argo CD command this module builds (its one binary,
// whose role ARGOCD_BINARY_NAME selects), so that `go mod tidy` keeps its
// dependencies in go.sum.
package tools

import (
	_ "github.com/argoproj/argo-cd/v3/cmd"
)
