package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type echoArgs struct {
	Name string `json:"name"`
	N    int    `json:"n"`
}

func startServer(t *testing.T, h Handler) *Server {
	t.Helper()
	// Unix socket paths are limited to ~108 bytes; t.TempDir can be longer.
	dir, err := os.MkdirTemp("", "ctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s, err := Listen(filepath.Join(dir, "control.sock"), h)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve() }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

func testHandler(ctx context.Context, op string, args json.RawMessage) (any, error) {
	switch op {
	case "echo":
		var a echoArgs
		if err := json.Unmarshal(args, &a); err != nil {
			return nil, err
		}
		a.N++
		return a, nil
	case "fail":
		return nil, &Error{Message: "no such disk: x", Hint: "run `encdisk disk list VOL`", Code: 1, Kind: "not_found"}
	case "plain":
		return nil, errors.New("plain failure")
	case "panic":
		panic("boom")
	case "slow":
		time.Sleep(200 * time.Millisecond)
		return "done", nil
	}
	return nil, errors.New("unknown op " + op)
}

func TestRoundTrip(t *testing.T) {
	s := startServer(t, testHandler)
	info, err := os.Stat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm != 0o600 {
		t.Errorf("socket mode %o, want 600", perm)
	}

	c, err := Dial(s.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 3; i++ { // several calls on one connection
		var got echoArgs
		if err := c.Call("echo", echoArgs{Name: "data1", N: i}, &got); err != nil {
			t.Fatal(err)
		}
		if got.Name != "data1" || got.N != i+1 {
			t.Fatalf("got %+v", got)
		}
	}

	tests := []struct {
		op, msg, hint string
	}{
		{"fail", "no such disk: x", "run `encdisk disk list VOL`"},
		{"plain", "plain failure", ""},
		{"panic", "internal error in panic: boom", ""},
	}
	for _, tt := range tests {
		t.Run(tt.op, func(t *testing.T) {
			err := c.Call(tt.op, nil, nil)
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v (%T), want *Error", err, err)
			}
			if ce.Message != tt.msg || ce.Hint != tt.hint || ce.Code == 0 || (tt.op == "fail") != (ce.Kind == "not_found") {
				t.Errorf("got %+v", ce)
			}
		})
	}
	// The connection survives errors and panics.
	if err := c.Call("echo", echoArgs{}, nil); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentClients(t *testing.T) {
	s := startServer(t, testHandler)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			var got echoArgs
			if err := Call(s.Path(), "echo", echoArgs{N: i}, &got, 5*time.Second); err != nil {
				t.Error(err)
				return
			}
			if got.N != i+1 {
				t.Errorf("got %d want %d", got.N, i+1)
			}
		}(i)
	}
	wg.Wait()
}

func TestNoDaemon(t *testing.T) {
	dir, err := os.MkdirTemp("", "ctl")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "control.sock")
	if _, err := Dial(path, time.Second); !errors.Is(err, ErrNoDaemon) {
		t.Fatalf("missing socket: err = %v, want ErrNoDaemon", err)
	}
	// A stale socket file: bound once, nobody listening now.
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	if _, err := Dial(path, time.Second); !errors.Is(err, ErrNoDaemon) {
		t.Fatalf("stale socket: err = %v, want ErrNoDaemon", err)
	}
}

// TestDaemonGone: a daemon that closes the connection without answering
// (it exited or was killed meanwhile) gives ErrDaemonGone.
func TestDaemonGone(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "control.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		bufio.NewReader(c).ReadBytes('\n') // the request, then nothing
		c.Close()
	}()
	err = Call(path, "image.copy", nil, nil, 10*time.Second)
	if !errors.Is(err, ErrDaemonGone) {
		t.Fatalf("Call to a daemon that hangs up: %v, want ErrDaemonGone", err)
	}
}

// rawExchange writes raw bytes and returns the first response line.
func rawExchange(t *testing.T, path string, data []byte) Response {
	t.Helper()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go c.Write(data) // may fail once the server hangs up on an oversized line
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	var r Response
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatalf("bad response %q: %v", line, err)
	}
	return r
}

func TestOversizedRequest(t *testing.T) {
	s := startServer(t, testHandler)
	big := `{"op":"echo","args":{"name":"` + strings.Repeat("a", MaxRequest) + `"}}` + "\n"
	r := rawExchange(t, s.Path(), []byte(big))
	if !strings.Contains(r.Error, "too large") {
		t.Fatalf("got %+v, want a too-large error", r)
	}
	// The client refuses to send one in the first place.
	err := Call(s.Path(), "echo", echoArgs{Name: strings.Repeat("a", MaxRequest)}, nil, time.Second)
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("client: err = %v, want ErrTooLarge", err)
	}
	// And the server is still fine.
	if err := Call(s.Path(), "echo", echoArgs{}, nil, time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestMalformedRequests(t *testing.T) {
	s := startServer(t, testHandler)
	for _, in := range []string{
		"not json\n",
		"{}\n",
		`{"op":""}` + "\n",
		`{"op":"Echo"}` + "\n",
		`{"op":"echo","extra":1}` + "\n",
		`{"op":"echo"} {"op":"echo"}` + "\n",
		`["echo"]` + "\n",
		`{"op":"echo","args":` + "\n",
	} {
		r := rawExchange(t, s.Path(), []byte(in))
		if !strings.Contains(r.Error, "malformed") || r.Code != 2 {
			t.Errorf("%q: got %+v, want a malformed-request error", in, r)
		}
	}
}

func TestCloseWaitsForHandlers(t *testing.T) {
	s := startServer(t, testHandler)
	c, err := Dial(s.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res := make(chan error, 1)
	go func() {
		var out string
		err := c.Call("slow", nil, &out)
		if err == nil && out != "done" {
			err = errors.New("bad result " + out)
		}
		res <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatalf("in-flight call: %v", err)
	}
	if _, err := os.Stat(s.Path()); !os.IsNotExist(err) {
		t.Errorf("socket file left after Close: %v", err)
	}
}

func TestCallTimeout(t *testing.T) {
	s := startServer(t, testHandler)
	err := Call(s.Path(), "slow", nil, nil, 20*time.Millisecond)
	if err == nil {
		t.Fatal("no timeout")
	}
}

// TestCallCancelHangsUp checks that a caller giving up (CallCancel) cancels
// the handler's context in the server, and that a call that was not given
// up on does not see its context canceled, on a connection that goes on
// serving further calls.
func TestCallCancelHangsUp(t *testing.T) {
	started := make(chan struct{}, 1)
	ended := make(chan error, 1)
	s := startServer(t, func(ctx context.Context, op string, args json.RawMessage) (any, error) {
		switch op {
		case "wait":
			started <- struct{}{}
			select {
			case <-ctx.Done():
				ended <- ctx.Err()
				return nil, ctx.Err()
			case <-time.After(30 * time.Second):
				ended <- nil
				return "finished", nil
			}
		case "check":
			return ctx.Err() == nil, nil
		}
		return testHandler(ctx, op, args)
	})
	cancel := make(chan struct{})
	res := make(chan error, 1)
	go func() { res <- CallCancel(s.Path(), "wait", nil, nil, time.Minute, cancel) }()
	<-started
	close(cancel)
	if err := <-res; !errors.Is(err, ErrCanceled) {
		t.Fatalf("CallCancel after cancel: %v, want ErrCanceled", err)
	}
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Fatalf("the handler's context after the client hung up: %v, want canceled", err)
	}

	// Several calls on one connection: the hang-up watch consumes nothing,
	// and a completed call's context was live while it ran.
	c, err := Dial(s.Path(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		var live bool
		if err := c.Call("check", nil, &live); err != nil || !live {
			t.Fatalf("call %d on one connection: live %v, %v", i, live, err)
		}
		var out echoArgs
		if err := c.Call("echo", echoArgs{Name: "x", N: i}, &out); err != nil || out.N != i+1 {
			t.Fatalf("echo %d: %+v, %v", i, out, err)
		}
	}
	// An answer that arrives is returned even if cancel is closed later.
	never := make(chan struct{})
	var out echoArgs
	if err := CallCancel(s.Path(), "echo", echoArgs{N: 1}, &out, time.Second, never); err != nil || out.N != 2 {
		t.Fatalf("CallCancel not canceled: %+v, %v", out, err)
	}
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"disk.list"}`,
		`{"op":"disk.create","args":{"name":"data1","size":8589934592,"encrypted":true}}`,
		`{"op":"daemon.umount","args":null}`,
		`{"op":"x","args":"\u0000"}`,
		`{}`, `null`, `[]`, `{"op":1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := DecodeRequest(line)
		if err != nil {
			if req != nil {
				t.Fatal("request returned with an error")
			}
			return
		}
		if validOp(req.Op) != nil {
			t.Fatalf("accepted bad op %q", req.Op)
		}
		// A decoded request re-encodes to something that decodes the same.
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req2, err := DecodeRequest(b)
		if err != nil {
			t.Fatalf("re-encoded request %s does not decode: %v", b, err)
		}
		if req2.Op != req.Op {
			t.Fatalf("op changed: %q -> %q", req.Op, req2.Op)
		}
	})
}
