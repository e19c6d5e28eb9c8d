// Package envelope is the Cobo TSS envelope as Cobo's Go reference servers read and write it: the
// form field TSS_JWT_MSG, a JWT signed RS256 whose claim package_data holds the payload bytes
// (standard base64, which encoding/json does for a []byte), keys in PEM files, and a JSON-lines
// record of what a server saw so that tests can count it.
package envelope

import (
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// PackageDataClaim is the claim layout of every token in the protocol (the reference servers' own type).
type PackageDataClaim struct {
	PackageData []byte `json:"package_data,omitempty"`
	jwt.RegisteredClaims
}

// LoadPublicKey reads a PEM public key (SPKI or PKCS#1).
func LoadPublicKey(path string) (*rsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return jwt.ParseRSAPublicKeyFromPEM(b)
}

// LoadPrivateKey reads a PEM private key (PKCS#8 or PKCS#1).
func LoadPrivateKey(path string) (*rsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return jwt.ParseRSAPrivateKeyFromPEM(b)
}

// Verified is what a valid token carried.
type Verified struct {
	Package []byte
	Issuer  string
}

// VerifyForm reads TSS_JWT_MSG from the request's form and verifies it: RS256 only, signed by
// pub, with an exp in the future.
func VerifyForm(r *http.Request, pub *rsa.PublicKey) (*Verified, error) {
	raw := strings.TrimSpace(r.PostFormValue("TSS_JWT_MSG"))
	if raw == "" {
		return nil, errors.New("form field TSS_JWT_MSG missing")
	}
	var claims PackageDataClaim
	_, err := jwt.ParseWithClaims(raw, &claims, func(*jwt.Token) (interface{}, error) { return pub, nil },
		jwt.WithValidMethods([]string{"RS256"}), jwt.WithExpirationRequired())
	if err != nil {
		return nil, err
	}
	if len(claims.PackageData) == 0 {
		return nil, errors.New("package_data missing")
	}
	return &Verified{Package: claims.PackageData, Issuer: claims.Issuer}, nil
}

// Sign makes a token whose package_data is data, as the Go callback template does.
func Sign(data []byte, key *rsa.PrivateKey, issuer string, expire time.Duration) (string, error) {
	claims := &PackageDataClaim{
		PackageData: data,
		RegisteredClaims: jwt.RegisteredClaims{
			ExpiresAt: jwt.NewNumericDate(time.Now().Add(expire)),
			Issuer:    issuer,
		},
	}
	return jwt.NewWithClaims(jwt.SigningMethodRS256, claims).SignedString(key)
}

// Sha256Hex is the lowercase hex SHA-256 of b: how a record names the exact bytes received.
func Sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Recorder appends one JSON object per line to a file; a nil Recorder records nothing.
type Recorder struct {
	mu   sync.Mutex
	path string
}

// NewRecorder records to path, or nowhere when path is empty.
func NewRecorder(path string) *Recorder {
	if path == "" {
		return nil
	}
	return &Recorder{path: path}
}

// Write appends entry as one line; the line is complete on disk when Write returns.
func (r *Recorder) Write(entry map[string]interface{}) error {
	if r == nil {
		return nil
	}
	line, err := json.Marshal(entry)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	f, err := os.OpenFile(r.path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Ping answers GET /ping as Cobo's servers do.
func Ping(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		WriteJSON(w, http.StatusOK, map[string]string{"server": name, "timestamp": fmt.Sprint(time.Now().UnixMilli())})
	}
}

// WriteJSON writes v as the JSON body, as gin's c.JSON does.
func WriteJSON(w http.ResponseWriter, status int, v interface{}) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
