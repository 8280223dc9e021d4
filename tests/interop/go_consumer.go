// A department system written in Go: a consumer calling govshare through code generated from
// its .proto files (protoc-gen-go, protoc-gen-go-grpc) with grpc-go, over mutual TLS.
//
// Usage: go_consumer ADDR IDENTITY_DIR DATASET_ID
//
// Like python_consumer.py: asks who it is, files a demand for DATASET_ID and waits for its
// approval, makes a Request for id_number "go-1", prints one line per step, waits for "go" on
// stdin (the test lets the broker's idle timeout end the connection meanwhile), then makes a
// second Request on the same connection. Exit status 0 only if every step did what it should.
//
// The generated package's import path is the go_package option of the .proto files.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/proto"
	v1 "govshare.example/gen/govshare/v1"
)

// codec marshals with protobuf-go (APIv2), which the generated code is for. Debian's grpc-go
// (1.33) encodes with github.com/golang/protobuf 1.3, from before APIv2, which cannot read
// APIv2 messages; a program built with Go modules and a current grpc-go needs none of this.
type codec struct{}

func (codec) Marshal(v interface{}) ([]byte, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("not a protobuf message: %T", v)
	}
	return proto.Marshal(m)
}

func (codec) Unmarshal(data []byte, v interface{}) error {
	m, ok := v.(proto.Message)
	if !ok {
		return fmt.Errorf("not a protobuf message: %T", v)
	}
	return proto.Unmarshal(data, m)
}

func (codec) Name() string { return "proto" }

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func step(what, value string) {
	fmt.Printf("%s %s\n", what, value)
}

// call is a 10 s deadline for one unary call.
func call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 10*time.Second)
}

func main() {
	if len(os.Args) != 4 {
		fail("usage: go_consumer ADDR IDENTITY_DIR DATASET_ID")
	}
	addr, identity, dataset := os.Args[1], os.Args[2], os.Args[3]
	encoding.RegisterCodec(codec{})

	cert, err := tls.LoadX509KeyPair(filepath.Join(identity, "node.pem"), filepath.Join(identity, "node.key"))
	if err != nil {
		fail("the node's certificate and key: %v", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(identity, "ca.pem"))
	if err != nil {
		fail("ca.pem: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		fail("ca.pem holds no certificate")
	}
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      roots,
		// The broker's development certificate names localhost; the test dials 127.0.0.1.
		ServerName: "localhost",
		MinVersion: tls.VersionTLS12,
	})
	conn, err := grpc.Dial(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		fail("dial %s: %v", addr, err)
	}
	defer conn.Close()

	ctx, cancel := call()
	who, err := v1.NewNodeServiceClient(conn).WhoAmI(ctx, &v1.WhoAmIRequest{})
	cancel()
	if err != nil {
		fail("WhoAmI: %v", err)
	}
	step("whoami", who.NodeId)

	sharing := v1.NewSharingServiceClient(conn)
	ctx, cancel = call()
	filed, err := sharing.FileDemand(ctx, &v1.FileDemandRequest{
		DatasetId: dataset,
		Fields:    []string{"id_number", "status"},
		Purpose:   "check pension recipients are alive",
	})
	cancel()
	if err != nil {
		fail("FileDemand: %v", err)
	}
	demand := filed.Demand
	until := time.Now().Add(20 * time.Second)
	for demand.State != v1.DemandState_DEMAND_STATE_APPROVED {
		if time.Now().After(until) {
			fail("the demand was not approved: %v", demand)
		}
		time.Sleep(50 * time.Millisecond)
		ctx, cancel = call()
		demand, err = sharing.GetDemand(ctx, &v1.GetDemandRequest{Id: demand.Id})
		cancel()
		if err != nil {
			fail("GetDemand: %v", err)
		}
	}
	step("approved", demand.GrantId)

	exchange := v1.NewExchangeServiceClient(conn)
	ask := func(idNumber string) string {
		ctx, cancel := call()
		defer cancel()
		result, err := exchange.Request(ctx, &v1.ExchangeRequest{
			DatasetId: dataset,
			Query: &v1.Query{
				Filters: []*v1.Filter{{
					Item:  "id_number",
					Value: &v1.Value{Kind: &v1.Value_StringValue{StringValue: idNumber}},
				}},
				Fields: []string{"id_number", "status"},
			},
		})
		if err != nil {
			fail("Request: %v", err)
		}
		if result.State != v1.ExchangeState_EXCHANGE_STATE_ANSWERED {
			fail("not answered: %v", result)
		}
		ok := len(result.Rows) == 1 && len(result.Rows[0].Fields) == 2 &&
			result.Rows[0].Fields["id_number"].GetStringValue() == idNumber &&
			result.Rows[0].Fields["status"].GetStringValue() == "ALIVE"
		if !ok {
			fail("the answer is not the provider's row about %s: %v", idNumber, result)
		}
		return result.State.String()
	}

	step("answered", ask("go-1"))
	step("waiting", "for the idle timeout")
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "go" {
		fail("the test did not say go")
	}
	// The broker has told the idle connection to go away; grpc-go opens a new one.
	step("answered", ask("go-2"))
}
