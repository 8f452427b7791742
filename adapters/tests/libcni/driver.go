// A container runtime's view of CNI, as containerd 1.7 drives it: libcni 1.1 (Debian's
// golang-github-appc-cni-dev) loads a conflist and runs its chain. Used by
// adapters/tests/libcni_real.rs.
//
// driver ADD|CHECK|DEL CONFLIST NETNS CONTAINER-ID IFNAME NAMESPACE/POD CACHE-DIR
//
// ADD prints the chain's result (converted to the conflist's version) as JSON; every command
// exits 1 with libcni's error on stderr when the chain fails. The plugins are found on
// CNI_PATH. The runtime config carries the capabilities the chain asks for: a port mapping
// (portmap) and a bandwidth limit (bandwidth).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func main() {
	if len(os.Args) != 8 {
		fmt.Fprintln(os.Stderr, "usage: driver ADD|CHECK|DEL CONFLIST NETNS ID IFNAME NS/POD CACHE-DIR")
		os.Exit(2)
	}
	cmd, conflist, netns, id, ifname, pod, cache := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6], os.Args[7]
	ns, name, _ := strings.Cut(pod, "/")
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(os.Getenv("CNI_PATH"), ":"), cache, nil)
	list, err := libcni.ConfListFromFile(conflist)
	if err != nil {
		fmt.Fprintln(os.Stderr, "conflist:", err)
		os.Exit(1)
	}
	rt := &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       netns,
		IfName:      ifname,
		// As containerd's go-cni passes them: IgnoreUnknown first, or the reference plugins
		// refuse the Kubernetes keys they do not know.
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", ns},
			{"K8S_POD_NAME", name},
			{"K8S_POD_INFRA_CONTAINER_ID", id},
		},
		CapabilityArgs: map[string]interface{}{
			"portMappings": []map[string]interface{}{
				{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"},
			},
			"bandwidth": map[string]interface{}{
				"ingressRate": 8000000, "ingressBurst": 1000000,
				"egressRate": 8000000, "egressBurst": 1000000,
			},
		},
	}
	ctx := context.Background()
	switch cmd {
	case "ADD":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		out, err := json.Marshal(res)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(string(out))
	case "CHECK":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "DEL":
		err = cni.DelNetworkList(ctx, list, rt)
	default:
		fmt.Fprintln(os.Stderr, "unknown command", cmd)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
