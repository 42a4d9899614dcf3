package config

import (
	"strings"
	"testing"
)

func TestBilling(t *testing.T) {
	c, err := Parse("/etc/encdisk/config.toml", []byte(`
[billing]
currency = "CNY"
price_per_10k_calls = 0.06
key_price_per_month = 6.0
balance = 12.5
`))
	if err != nil {
		t.Fatal(err)
	}
	b := c.Billing
	if b.Currency != "CNY" || b.PricePer10kCalls != 0.06 || b.Balance == nil || *b.Balance != 12.5 || b.DailyKeyPrice() != 0.2 {
		t.Errorf("got %+v", b)
	}
	for _, bad := range []struct{ text, want string }{
		{"[billing]\nprice_per_10k_calls = -1", "negative"},
		{"[billing]\nkey_price_per_day = 1\nkey_price_per_month = 30", "both set"},
		{"[billing]\nprice = 1", "unknown key billing.price"},
		{"[billing]\nprice_per_10k_calls = nan", "[billing] price_per_10k_calls = NaN: give a number"},
		{"[billing]\nkey_price_per_day = inf", "[billing] key_price_per_day = +Inf: give a number"},
		{"[billing]\nkey_price_per_month = -inf", "[billing] key_price_per_month = -Inf: give a number"},
		{"[billing]\nbalance = nan", "[billing] balance = NaN: give a number"},
		{"[billing]\nbalance = +inf", "[billing] balance = +Inf: give a number"},
	} {
		if _, err := Parse("c.toml", []byte(bad.text)); err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%q: %v, want %q", bad.text, err, bad.want)
		}
	}
	c, err = Parse("c.toml", []byte(""))
	if err != nil || c.Billing.Balance != nil || c.Billing.DailyKeyPrice() != 0 {
		t.Errorf("empty: %+v %v", c.Billing, err)
	}
}
