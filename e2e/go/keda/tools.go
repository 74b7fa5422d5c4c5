//go:build tools

// Package tools pins the KEDA commands this module builds (the operator, with
// its gRPC metrics service, and the external-metrics apiserver), so that
// `go mod tidy` keeps their dependencies in go.sum.
package tools

import (
	_ "github.com/kedacore/keda/v2/cmd/adapter"
	_ "github.com/kedacore/keda/v2/cmd/operator"
)
