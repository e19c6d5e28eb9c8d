// Command eventserver is a TSS Node event server in the manner of Cobo's Go reference event
// server (cobo-mpc-event-server-golang): POST /v2/event with the form field TSS_JWT_MSG, a JWT
// verified RS256 with the sender's public key (here: the gateway's downstream signing key), its
// package_data decoded into the SDK's cobo_waas2.TSSEvent and the event data's extra_info into
// the SDK's ...Extra model. It answers plain HTTP: 200 accepted, 400 refused. Every request is
// recorded as one JSON line (refusals too), so tests can see what arrived and how many times.
//
//	eventserver --listen 127.0.0.1:11030 --gateway-pub gateway-requests-pub.key --record events.jsonl
package main

import (
	"crypto/rsa"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"

	"github.com/CoboGlobal/cobo-waas2-go-sdk/cobo_waas2"

	"tss-callback-gateway/tests/gopeers/internal/envelope"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:11030", "address to listen on")
	pubPath := flag.String("gateway-pub", "", "public key of whoever signs the events (PEM)")
	record := flag.String("record", "", "append one JSON line per request to this file")
	name := flag.String("name", "cobo-go-event-server", "service name, in /ping and in records")
	flag.Parse()
	pub, err := envelope.LoadPublicKey(*pubPath)
	if err != nil {
		log.Fatalf("event server key %q: %v", *pubPath, err)
	}
	rec := envelope.NewRecorder(*record)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", envelope.Ping(*name))
	mux.HandleFunc("POST /v2/event", func(w http.ResponseWriter, r *http.Request) {
		entry, err := handle(r, pub)
		entry["server"] = *name
		if err != nil {
			entry["refused"] = err.Error()
			log.Printf("event refused: %v", err)
		}
		if werr := rec.Write(entry); werr != nil {
			log.Printf("record: %v", werr)
			envelope.WriteJSON(w, http.StatusInternalServerError, "")
			return
		}
		if err != nil {
			envelope.WriteJSON(w, http.StatusBadRequest, "")
			return
		}
		envelope.WriteJSON(w, http.StatusOK, "")
	})
	log.Printf("%s listening on %s", *name, *listen)
	log.Fatal(http.ListenAndServe(*listen, mux))
}

// handle verifies the token and decodes the event; the entry describes what was seen either way.
func handle(r *http.Request, pub *rsa.PublicKey) (map[string]interface{}, error) {
	entry := map[string]interface{}{}
	v, err := envelope.VerifyForm(r, pub)
	if err != nil {
		return entry, fmt.Errorf("token: %w", err)
	}
	entry["iss"] = v.Issuer
	entry["sha256"] = envelope.Sha256Hex(v.Package)
	var event cobo_waas2.TSSEvent
	if err := event.UnmarshalJSON(v.Package); err != nil {
		return entry, fmt.Errorf("TSSEvent: %w", err)
	}
	entry["event_id"] = event.GetEventId()
	entry["event_type"] = string(event.GetEventType())
	entry["node_id"] = event.GetNodeId()
	entry["created_timestamp"] = event.GetCreatedTimestamp()
	if event.Data == nil {
		return entry, nil
	}
	model, err := describe(event.Data.GetActualInstance(), entry)
	if err != nil {
		return entry, err
	}
	entry["model"] = model
	return entry, nil
}

// eventData is what the four TSS...EventData models have in common.
type eventData interface {
	GetDataType() cobo_waas2.TSSEventDataType
	GetRequestId() string
	GetRequestType() cobo_waas2.TSSRequestTypeEenum
	GetRequestStatus() cobo_waas2.TSSStatus
	GetExtraInfo() string
}

// describe records the event data's common fields and decodes its extra_info into the SDK model
// of its kind, as the reference server does; it returns the model's name.
func describe(instance interface{}, entry map[string]interface{}) (string, error) {
	var extra interface{}
	switch instance.(type) {
	case *cobo_waas2.TSSKeyGenEventData:
		extra = &cobo_waas2.TSSKeyGenExtra{}
	case *cobo_waas2.TSSKeySignEventData:
		extra = &cobo_waas2.TSSKeySignExtra{}
	case *cobo_waas2.TSSKeyReshareEventData:
		extra = &cobo_waas2.TSSKeyReshareExtra{}
	case *cobo_waas2.TSSKeyShareSignEventData:
		extra = &cobo_waas2.TSSKeyShareSignExtra{}
	default:
		// A data_type the SDK does not know decodes to nothing, without an error.
		return "", nil
	}
	data := instance.(eventData)
	entry["data_type"] = string(data.GetDataType())
	entry["request_id"] = data.GetRequestId()
	entry["request_type"] = string(data.GetRequestType())
	entry["request_status"] = int32(data.GetRequestStatus())
	if raw := data.GetExtraInfo(); raw != "" {
		if err := json.Unmarshal([]byte(raw), extra); err != nil {
			return "", fmt.Errorf("extra_info: %w", err)
		}
	}
	return fmt.Sprintf("%T", instance)[len("*cobo_waas2."):], nil
}
