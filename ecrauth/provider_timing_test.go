package ecrauth

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// These tests run in a synctest bubble: time is fake and advances only when
// every goroutine in the bubble is blocked, so hours pass instantly and
// backoff waits are exact.

func TestProviderRefreshAtHalfLife(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			return fmt.Sprintf("pw%d", n), 12 * time.Hour, nil
		}}
		log, _ := newTestLogger(t)
		obs := newCountingObserver()
		p := newFakeProvider(t, api, log, WithObserver(obs))
		reg := mustParse(t, hostUSW2)

		get := func() string {
			t.Helper()
			c, err := p.Credentials(t.Context(), reg)
			if err != nil {
				t.Fatal(err)
			}
			return c.Password.Reveal()
		}
		if got := get(); got != "pw1" {
			t.Fatalf("first token %q", got)
		}
		time.Sleep(6*time.Hour - time.Minute)
		if got := get(); got != "pw1" || api.Calls() != 1 {
			t.Fatalf("before half-life: token %q after %d calls, want pw1 after 1", got, api.Calls())
		}
		time.Sleep(2 * time.Minute)
		if got := get(); got != "pw2" || api.Calls() != 2 {
			t.Fatalf("after half-life: token %q after %d calls, want pw2 after 2", got, api.Calls())
		}
		if obs.hit(APIECR) != 1 {
			t.Errorf("cache hits = %d, want 1", obs.hit(APIECR))
		}
	})
}

func TestProviderKeepsValidTokenWhenRefreshFails(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		denied := errors.New("AccessDeniedException: not today")
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			if n == 1 {
				return "pw1", 12 * time.Hour, nil
			}
			return "", 0, denied
		}}
		log, logs := newTestLogger(t)
		p := newFakeProvider(t, api, log)
		reg := mustParse(t, hostUSW2)
		if _, err := p.Credentials(t.Context(), reg); err != nil {
			t.Fatal(err)
		}
		time.Sleep(7 * time.Hour)
		c, err := p.Credentials(t.Context(), reg)
		if err != nil || c.Password.Reveal() != "pw1" {
			t.Fatalf("after a failed half-life refresh: err=%v, cached token kept=%v", err, c.Password.Reveal() == "pw1")
		}
		if !strings.Contains(logs.String(), "using the cached token") {
			t.Errorf("no warning logged: %s", logs.String())
		}
		time.Sleep(5*time.Hour + time.Minute)
		if _, err := p.Credentials(t.Context(), reg); !errors.Is(err, denied) {
			t.Fatalf("after expiry: err = %v, want the refresh error", err)
		}
		assertNoSecret(t, "logs", logs.String(), "pw1")
	})
}

func TestProviderThrottling(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		throttled int // calls answered with ThrottlingException; -1: all
		deadline  time.Duration
		wantErr   bool
		wantCalls int // 0: don't check
		minWait   time.Duration
	}{
		{name: "recovers", throttled: 3, deadline: time.Minute, wantCalls: 4,
			minWait: backoffBase/2 + backoffBase + 2*backoffBase}, // the fixed halves of 3 steps
		{name: "gives up at the deadline", throttled: -1, deadline: 30 * time.Second, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
					if tc.throttled < 0 || n <= tc.throttled {
						return "", 0, throttleErr
					}
					return "pw", 12 * time.Hour, nil
				}}
				log, _ := newTestLogger(t)
				obs := newCountingObserver()
				p := newFakeProvider(t, api, log, WithObserver(obs), WithRetryDeadline(tc.deadline))
				start := time.Now()
				_, err := p.Credentials(t.Context(), mustParse(t, hostUSW2))
				waited := time.Since(start)
				if (err != nil) != tc.wantErr {
					t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
				}
				if tc.wantErr {
					if !strings.Contains(err.Error(), "gave up after") || !strings.Contains(err.Error(), "ThrottlingException") {
						t.Errorf("err = %q, want it to say it gave up on throttling", err)
					}
					if waited > tc.deadline {
						t.Errorf("waited %v, past the %v deadline", waited, tc.deadline)
					}
					if api.Calls() < 4 {
						t.Errorf("only %d attempts within %v", api.Calls(), tc.deadline)
					}
				}
				if tc.wantCalls != 0 && api.Calls() != tc.wantCalls {
					t.Errorf("calls = %d, want %d", api.Calls(), tc.wantCalls)
				}
				if waited < tc.minWait {
					t.Errorf("waited %v, want at least %v of backoff", waited, tc.minWait)
				}
				if got := obs.request(APIECR, ResultThrottled); got != api.Calls()-map[bool]int{true: 0, false: 1}[tc.wantErr] {
					t.Errorf("observer throttled = %d with %d calls", got, api.Calls())
				}
			})
		})
	}
}

func TestBackoffJitterBounds(t *testing.T) {
	t.Parallel()
	for attempt := range 20 {
		step := min(backoffMax, backoffBase<<min(attempt, 15))
		for range 50 {
			d := backoff(attempt)
			if d < step/2 || d > step {
				t.Fatalf("backoff(%d) = %v, want within [%v, %v]", attempt, d, step/2, step)
			}
		}
	}
}

func TestProviderRejectForcesOneRefresh(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			return fmt.Sprintf("pw%d", n), 12 * time.Hour, nil
		}}
		log, logs := newTestLogger(t)
		obs := newCountingObserver()
		p := newFakeProvider(t, api, log, WithObserver(obs), WithRejectCooldown(time.Minute))
		reg := mustParse(t, hostUSW2)
		get := func() (string, error) {
			c, err := p.Credentials(t.Context(), reg)
			return c.Password.Reveal(), err
		}

		if pw, _ := get(); pw != "pw1" {
			t.Fatalf("got %q", pw)
		}
		p.rejected(reg, "pw1")
		if pw, err := get(); pw != "pw2" || err != nil {
			t.Fatalf("after a 401: %q, %v; want a fresh token pw2", pw, err)
		}
		// A late 401 for the old token (another pull) changes nothing.
		p.rejected(reg, "pw1")
		if pw, _ := get(); pw != "pw2" || api.Calls() != 2 {
			t.Fatalf("late 401 for an old token: %q after %d calls", pw, api.Calls())
		}
		// The refreshed token is rejected too: fail fast, no more calls.
		p.rejected(reg, "pw2")
		_, err := get()
		if !errors.Is(err, ErrRejected) || !strings.Contains(err.Error(), hostUSW2) {
			t.Fatalf("after a second 401: err = %v, want ErrRejected naming the host", err)
		}
		if api.Calls() != 2 {
			t.Fatalf("calls = %d, want 2", api.Calls())
		}
		// After the cooldown one more attempt is allowed.
		time.Sleep(time.Minute + time.Second)
		if pw, err := get(); pw != "pw3" || err != nil {
			t.Fatalf("after cooldown: %q, %v", pw, err)
		}
		if n := obs.rejections(APIECR); n != 2 {
			t.Errorf("observer rejected = %d, want 2", n)
		}
		assertNoSecret(t, "logs", logs.String(), "pw1", "pw2", "pw3")
		assertNoSecret(t, "error", err.Error(), "pw1", "pw2")
	})
}

func TestProviderConcurrentRejectsCostOneCall(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			return fmt.Sprintf("pw%d", n), 12 * time.Hour, nil
		}}
		log, _ := newTestLogger(t)
		p := newFakeProvider(t, api, log)
		reg := mustParse(t, hostUSW2)
		if _, err := p.Credentials(t.Context(), reg); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for range 20 {
			wg.Go(func() {
				p.rejected(reg, "pw1")
				c, err := p.Credentials(t.Context(), reg)
				if err != nil || c.Password.Reveal() != "pw2" {
					t.Errorf("err=%v, fresh=%v", err, c.Password.Reveal() == "pw2")
				}
			})
		}
		wg.Wait()
		if api.Calls() != 2 {
			t.Errorf("calls = %d, want 2 (one refresh for 20 concurrent 401s)", api.Calls())
		}
	})
}

func TestProviderInvalidate(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			return fmt.Sprintf("pw%d", n), 12 * time.Hour, nil
		}}
		log, _ := newTestLogger(t)
		p := newFakeProvider(t, api, log)
		if p.Invalidate(hostUSW2) {
			t.Error("Invalidate before any token reported true")
		}
		if p.Invalidate("registry-1.docker.io") {
			t.Error("Invalidate of a non-ECR host reported true")
		}
		if _, err := p.Credentials(t.Context(), mustParse(t, hostUSW2)); err != nil {
			t.Fatal(err)
		}
		if !p.Invalidate("999999999999.dkr.ecr.us-west-2.amazonaws.com") {
			t.Fatal("Invalidate of a cached region reported false")
		}
		c, err := p.Credentials(t.Context(), mustParse(t, hostUSW2))
		if err != nil || c.Password.Reveal() != "pw2" {
			t.Fatalf("after Invalidate: err=%v, fresh=%v", err, c.Password.Reveal() == "pw2")
		}
	})
}

// TestProviderFetchEndingAfterAMiss: a caller that found the token stale,
// and whose shared fetch starts only after another caller's fetch has ended,
// uses the token that fetch cached. It must not fetch a third: that one
// would not count as forced, so a registry rejecting every token would cost
// two more API calls (CI saw 4 token calls where 2 were expected).
func TestProviderFetchEndingAfterAMiss(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		api := &fakeTokenAPI{respond: func(n int) (string, time.Duration, error) {
			return fmt.Sprintf("pw%d", n), 12 * time.Hour, nil
		}}
		log, _ := newTestLogger(t)
		p := newFakeProvider(t, api, log, WithRejectCooldown(time.Minute))
		reg := mustParse(t, hostUSW2)
		if _, err := p.Credentials(t.Context(), reg); err != nil {
			t.Fatal(err)
		}
		p.rejected(reg, "pw1")

		// The late caller misses the cache; before its fetch starts, another
		// caller fetches pw2 (forced, because pw1 was rejected).
		p.testAfterMiss = func() {
			p.testAfterMiss = nil
			if c, err := p.Credentials(t.Context(), reg); err != nil || c.Password.Reveal() != "pw2" {
				t.Errorf("the other caller: err=%v, got pw2=%v", err, c.Password.Reveal() == "pw2")
			}
		}
		c, err := p.Credentials(t.Context(), reg)
		if err != nil || c.Password.Reveal() != "pw2" {
			t.Fatalf("late caller: err=%v, got pw2=%v; want the token the other fetch cached", err, c.Password.Reveal() == "pw2")
		}
		if api.Calls() != 2 {
			t.Fatalf("calls = %d, want 2", api.Calls())
		}
		// pw2 was fetched because pw1 was rejected: its rejection fails fast.
		p.rejected(reg, "pw2")
		p.testAfterMiss = func() { p.testAfterMiss = nil; p.rejected(reg, "pw2") }
		if _, err := p.Credentials(t.Context(), reg); !errors.Is(err, ErrRejected) {
			t.Fatalf("after pw2 was rejected: err = %v, want ErrRejected", err)
		}
		if api.Calls() != 2 {
			t.Fatalf("calls = %d, want 2 (no refresh after the refreshed token was rejected)", api.Calls())
		}
	})
}
