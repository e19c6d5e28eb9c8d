// Command callbackserver is a TSS Node callback server in the manner of Cobo's Go callback
// template (cobo-mpc-callback-server-v2-golang): POST /v2/check (and /v1/check) with the form
// field TSS_JWT_MSG, a JWT verified RS256 with the caller's public key (here: the gateway's), its
// package_data decoded by encoding/json into the SDK's cobo_waas2.TSSCallbackRequest — Go's
// decoder matches keys ignoring letter case, which is the point of this server in the tests — and
// an answer JWT signed RS256 with this server's own key whose package_data is a
// cobo_waas2.TSSCallbackResponse, sent as a JSON string (the template's c.JSON(200, token)).
// Every request is recorded as one JSON line, with the request_type Go's decoder read.
//
//	callbackserver --listen 127.0.0.1:11021 --key go-server-pri.pem --gateway-pub gateway-pub.key \
//	    [--policy approve|reject] [--record FILE]
package main

import (
	"crypto/rsa"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"time"

	"github.com/CoboGlobal/cobo-waas2-go-sdk/cobo_waas2"

	"tss-callback-gateway/tests/gopeers/internal/envelope"
)

// Status codes of the protocol, as the template names them.
const (
	statusOK             = 0
	statusInvalidRequest = 10
	statusInvalidToken   = 20
)

type server struct {
	name   string
	key    *rsa.PrivateKey
	pub    *rsa.PublicKey
	policy string
	expire time.Duration
	rec    *envelope.Recorder
}

func main() {
	listen := flag.String("listen", "127.0.0.1:11021", "address to listen on")
	keyPath := flag.String("key", "", "this server's private key (PEM)")
	pubPath := flag.String("gateway-pub", "", "the caller's public key (PEM)")
	policy := flag.String("policy", "approve", "approve | reject")
	record := flag.String("record", "", "append one JSON line per request to this file")
	name := flag.String("name", "cobo-go-callback-server", "service name: iss of the answers, /ping")
	expire := flag.Int("token-expire-minutes", 2, "lifetime of the answer tokens")
	flag.Parse()
	if *policy != "approve" && *policy != "reject" {
		log.Fatalf("--policy must be approve or reject, not %q", *policy)
	}
	key, err := envelope.LoadPrivateKey(*keyPath)
	if err != nil {
		log.Fatalf("callback server key %q: %v", *keyPath, err)
	}
	pub, err := envelope.LoadPublicKey(*pubPath)
	if err != nil {
		log.Fatalf("caller key %q: %v", *pubPath, err)
	}
	s := &server{name: *name, key: key, pub: pub, policy: *policy,
		expire: time.Duration(*expire) * time.Minute, rec: envelope.NewRecorder(*record)}

	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", envelope.Ping(*name))
	mux.HandleFunc("POST /v2/check", s.check)
	mux.HandleFunc("POST /v1/check", s.check)
	log.Printf("%s listening on %s", *name, *listen)
	log.Fatal(http.ListenAndServe(*listen, mux))
}

func (s *server) check(w http.ResponseWriter, r *http.Request) {
	v, err := envelope.VerifyForm(r, s.pub)
	if err != nil {
		_ = s.rec.Write(map[string]interface{}{"server": s.name, "refused": "token: " + err.Error()})
		s.answer(w, "", statusInvalidToken, cobo_waas2.TSSCALLBACKACTIONTYPE_REJECT, err.Error())
		return
	}
	// The template's own decoding: encoding/json into the request type, keys matched ignoring case.
	var req cobo_waas2.TSSCallbackRequest
	if err := json.Unmarshal(v.Package, &req); err != nil {
		_ = s.rec.Write(map[string]interface{}{"server": s.name, "refused": "request: " + err.Error()})
		s.answer(w, "", statusInvalidRequest, cobo_waas2.TSSCALLBACKACTIONTYPE_REJECT, err.Error())
		return
	}
	action, reason := cobo_waas2.TSSCALLBACKACTIONTYPE_APPROVE, ""
	if s.policy == "reject" && req.GetRequestType() != cobo_waas2.TSSCALLBACKREQUESTTYPE_PING {
		action, reason = cobo_waas2.TSSCALLBACKACTIONTYPE_REJECT, "go policy rejects everything"
	}
	entry := map[string]interface{}{
		"server":     s.name,
		"request_id": req.GetRequestId(),
		"sha256":     envelope.Sha256Hex(v.Package),
		"iss":        v.Issuer,
		"action":     string(action),
	}
	if req.RequestType != nil {
		entry["request_type"] = int32(*req.RequestType)
	}
	if err := s.rec.Write(entry); err != nil {
		log.Printf("record: %v", err)
	}
	s.answer(w, req.GetRequestId(), statusOK, action, reason)
}

// answer signs a TSSCallbackResponse and sends the token as a JSON string, HTTP 200.
func (s *server) answer(w http.ResponseWriter, requestID string, status int32, action cobo_waas2.TSSCallbackActionType, reason string) {
	resp := cobo_waas2.NewTSSCallbackResponse()
	resp.SetRequestId(requestID)
	resp.SetStatus(status)
	resp.SetAction(action)
	if reason != "" {
		resp.SetError(reason)
	}
	data, err := resp.MarshalJSON()
	if err != nil {
		envelope.WriteJSON(w, http.StatusInternalServerError, err.Error())
		return
	}
	token, err := envelope.Sign(data, s.key, s.name, s.expire)
	if err != nil {
		envelope.WriteJSON(w, http.StatusInternalServerError, err.Error())
		return
	}
	envelope.WriteJSON(w, http.StatusOK, token)
}
