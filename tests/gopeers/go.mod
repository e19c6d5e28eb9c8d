module tss-callback-gateway/tests/gopeers

go 1.22

require (
	github.com/CoboGlobal/cobo-waas2-go-sdk v1.25.0
	github.com/golang-jwt/jwt/v5 v5.3.1
)

require (
	github.com/btcsuite/btcd/btcec/v2 v2.3.4 // indirect
	github.com/decred/dcrd/dcrec/secp256k1/v4 v4.0.1 // indirect
	github.com/google/uuid v1.6.0 // indirect
	github.com/shopspring/decimal v1.4.0 // indirect
	golang.org/x/oauth2 v0.21.0 // indirect
)
